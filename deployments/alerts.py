"""Alerts: a failed nightly, or a model the gate rejected, notifies the people who run smolflow.

Two Prefect automations send through one notification block that you choose: a webhook
(`custom-webhook/<name>`), Slack (`slack-webhook/<name>`), email (`sendgrid-email/<name>`) or any
other Prefect notification block type, made in the UI (Blocks) or by this script:

    python -m deployments.alerts --webhook-url https://example.org/hook    # saves custom-webhook/smolflow-alerts
    python -m deployments.alerts --block slack-webhook/team-ml             # a block you already saved

`python -m deployments.serve` creates the automations itself when SMOLFLOW_ALERT_BLOCK names the
block. Re-running replaces them (same names), so this is safe to repeat.
"""

from __future__ import annotations

import argparse
import os
import sys

from tasks.gate import REJECTED_EVENT

BLOCK_ENV = "SMOLFLOW_ALERT_BLOCK"  # "<block type slug>/<block name>", e.g. custom-webhook/smolflow-alerts
DEFAULT_BLOCK = "smolflow-alerts"
URL_ENV = "SMOLFLOW_ALERT_WEBHOOK_URL"  # the webhook URL, for `smolflow alerts` without it on the command line
FAILED_NIGHTLY = "smolflow: nightly run failed"
REJECTED = "smolflow: promotion rejected"
FAILED_STATES = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut")


def save_webhook_block(url: str, name: str = DEFAULT_BLOCK) -> str:
    """Save a Custom Webhook notification block that POSTs {"subject", "text"} as JSON; its slug."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    # The URL is the credential (Slack's and Teams' hold their token in the path): kept in the
    # block's secrets, which Prefect stores encrypted and shows masked, and substituted at send time.
    CustomWebhookNotificationBlock(
        name=name, url="{{webhook_url}}", secrets={"webhook_url": url},
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
    ).save(name, overwrite=True)
    return f"custom-webhook/{name}"


def check_webhook_url(url: str, given_by: str) -> None:
    """An http(s) URL with a host; `not a url` was saved, and every alert then failed to send. The
    value is never echoed: the URL is the credential."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{given_by}: not a webhook URL (it must start with https:// or http:// and name a host, "
                         "e.g. https://hooks.slack.com/services/...; not shown here, as it is a credential)")


def _block_document_id(slug: str, named_by: str = BLOCK_ENV):
    """The saved block's id; `named_by` is where the slug came from (the variable, or --block)."""
    from prefect.blocks.core import Block

    if "/" not in slug:
        raise ValueError(f"{named_by}={slug!r}: write it as '<block type slug>/<block name>', "
                         f"e.g. custom-webhook/{DEFAULT_BLOCK}")
    try:
        return Block.load(slug)._block_document_id
    except ValueError as err:
        raise ValueError(f"{named_by}={slug!r}: no such notification block on the Prefect server ({err}). "
                         "Create it in the UI (Blocks) or with: python -m deployments.alerts --webhook-url URL") from None


def automations(block_id, nightly_tag: str = "nightly") -> list:
    """The two automations: any failed/crashed flow run tagged `nightly_tag`, and a rejected promotion."""
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    failed = Automation(
        name=FAILED_NIGHTLY,
        description="A nightly smolflow run failed, crashed or timed out.",
        trigger=EventTrigger(
            expect=set(FAILED_STATES),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{nightly_tag}"},
            posture=Posture.Reactive, threshold=1,
        ),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="smolflow: nightly run {{ event.resource['prefect.resource.name'] }} failed",
            body=("Nightly run {{ event.resource['prefect.resource.name'] }} ended with {{ event.event }} "
                  "at {{ event.occurred }}: {{ flow_run.state.message }}"),
        )],
    )
    rejected = Automation(
        name=REJECTED,
        description="The regression gate did not promote a run's model.",
        trigger=EventTrigger(
            expect={REJECTED_EVENT}, match={"prefect.resource.id": "smolflow.run.*"},
            posture=Posture.Reactive, threshold=1,
        ),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="smolflow: model of run {{ event.resource['prefect.resource.name'] }} not promoted",
            body=("Run {{ event.resource['prefect.resource.name'] }} was compared with the "
                  "{{ event.payload['against'] }} and not promoted:\n"
                  "{% for reason in event.payload['reasons'] %}- {{ reason }}\n{% endfor %}"),
        )],
    )
    return [failed, rejected]


def ensure_alerts(block: str | None = None, nightly_tag: str = "nightly") -> list[str]:
    """Create (or replace) the alert automations on the configured server; their ids."""
    from prefect.automations import Automation

    named_by = "--block" if block else BLOCK_ENV
    block = block or os.environ.get(BLOCK_ENV)
    if not block:
        raise ValueError(f"no notification block: set {BLOCK_ENV}=<type>/<name> or pass --block/--webhook-url")
    block_id = _block_document_id(block, named_by)
    ids = []
    for automation in automations(block_id, nightly_tag):
        while True:  # drop the earlier versions of this automation (none the first time)
            try:
                Automation.read(name=automation.name).delete()
            except ValueError:
                break
        ids.append(str(automation.create().id))
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smolflow alerts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", help=f"a saved notification block, <type>/<name> (default: ${BLOCK_ENV})")
    parser.add_argument("--webhook-url", help=f"save a Custom Webhook block '{DEFAULT_BLOCK}' posting to this URL "
                        f"(kept as a secret); '-' reads it from stdin, and ${URL_ENV} gives it too, both out of `ps`")
    parser.add_argument("--nightly-tag", default="nightly", help="alert on failed flow runs with this tag")
    args = parser.parse_args(argv)
    try:
        url = (sys.stdin.readline().strip() if args.webhook_url == "-" else
               args.webhook_url or (None if args.block else os.environ.get(URL_ENV)))
        if args.webhook_url == "-" and not url:
            raise ValueError("--webhook-url -: no URL on stdin (give it as the first line)")
        if url:
            check_webhook_url(url, "--webhook-url" if args.webhook_url else URL_ENV)
        block = save_webhook_block(url) if url else args.block
        ids = ensure_alerts(block, args.nightly_tag)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"alerts through {block or os.environ.get(BLOCK_ENV)}: automations {', '.join(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
