"""`smolflow`: every entry point of the project as one command.

    smolflow run       [--config FILE] [--section.field VALUE ...]   fine-tune + evaluate (smolflow-finetune)
    smolflow eval      --model MODEL_OR_RUN_ID [settings ...]        score a model without training
    smolflow validate  [--config FILE] [settings ...]                check everything, run nothing heavy
    smolflow runs      [--root URI]                                  list the runs under an artifact root
    smolflow compare   RUN_A RUN_B [--root URI]                      two runs side by side
    smolflow promote   RUN_ID --reason TEXT [--root URI]             make a run the promoted one by hand (roll back)
    smolflow serve     [--port 4200] [settings ...]                  Prefect server + the deployments (the nightly's settings)
    smolflow gc        [--root URI] [--dry-run]                      apply retention, bound the caches
    smolflow alerts    --webhook-url URL | --block TYPE/NAME         notify on a failed nightly / rejected model
    smolflow arena run [settings ...] | arena serve [--root URI]     blind battles, leaderboard, vote page

A user error (bad flag, bad YAML, missing file, invalid value) prints one message naming the
field, file and line, and exits 2; `--debug` shows the traceback instead. The console is quiet
(one progress line per stage step); `--verbose` shows library logs and progress bars. Both flags
go anywhere on the line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import os
import select
import signal
import sys
from collections.abc import Callable

import yaml

from flows.cli_runs import cmd_compare, cmd_promote, cmd_runs
from tasks.config_eval import NOT_IN_EVAL
from tasks.config_args import ServeConfig, UserError, config_help, locate, parse_config, port_number
from tasks.leftovers import own_temp_root
from tasks.runtime import env_defaults, redact_url

EXIT_USER_ERROR = 2
DEFAULT_ROOT = "./smolflow-runs"
LOCAL_SERVER = os.environ.get("SMOLFLOW_LOCAL_SERVER", "http://127.0.0.1:4200/api")  # `smolflow serve`'s default


class FlowFailed(Exception):
    """A flow run failed; Prefect has logged its traceback, the command says it in one line."""


def run_flow(flow, config):
    """The flow's result. A bad setting or file found inside it stays a user error (exit 2); any
    other failure becomes one line (exit 1) under the traceback Prefect logged, not a second one."""
    try:
        return flow(config=config)
    except (UserError, ValueError, FileNotFoundError):
        raise
    except Exception as err:
        raise FlowFailed(f"the {flow.name} flow run failed: {type(err).__name__}: {err} "
                         "(its traceback is in the log above; --debug raises it here too)") from err


def _print(obj) -> None:
    text = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True, width=120)
    try:
        text.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except UnicodeEncodeError:  # a latin-1 terminal or pipe: YAML's own "\u2248" escapes, which read back the same
        text = yaml.safe_dump(obj, sort_keys=False, width=120)
    print(text, end="")


def _safe_streams() -> None:
    """stdout and stderr write what their encoding can't hold as \\uXXXX escapes instead of raising:
    under a non-UTF-8 locale (LANG=en_US.ISO-8859-1) a prompt with '≈' in it ended the command."""
    for stream in (sys.stdout, sys.stderr):
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors="backslashreplace")


# ---- commands --------------------------------------------------------------------------------


@contextlib.contextmanager
def join_running_server(url: str = LOCAL_SERVER):
    """Report to a Prefect server already running here (`smolflow serve`) instead of starting one.

    Without an API URL every flow process starts a temporary server of its own (~10 s of a cached
    re-run here, and its runs vanish with it). When none is configured and `url` answers its health
    check, the flow runs inside this block use it and show up in that server's UI. Prefect read its
    settings when it was imported (the input checks import it), so the URL goes into its settings
    context, and into the environment for the processes the run starts. Yields the URL or None.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings
    import urllib.request

    if PREFECT_API_URL.value():
        yield None
        return
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            answers = response.status == 200
    except OSError:
        answers = False
    if not answers:
        yield None
        return
    os.environ["PREFECT_API_URL"] = url
    where = redact_url(url.removesuffix("/api"))  # SMOLFLOW_LOCAL_SERVER may hold user:password@
    print(f"smolflow: reporting to the Prefect server running at {where}", file=sys.stderr)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    """Fine-tune and evaluate, as the smolflow-finetune flow."""
    from tasks.checks import check_inputs, check_run
    from tasks.reachable import check_reachable
    from tasks.console import configure_logging

    config = parse_config(rest)
    configure_logging()  # the checks read the data: quiet unless --verbose, as the flow will be
    # Fail within seconds, before Prefect, W&B or any run file is started: the model and the data
    # first (a few seconds), then the cross-checks (trying SFTConfig imports TRL: ~8 s here).
    check_reachable(config)  # the hub, the store, the judge's endpoint, a Ray cluster: before the inputs
    check_inputs(config)
    check_run(config)
    from flows.finetune import finetune

    with join_running_server():
        _print(run_flow(finetune, config))
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    """Score one model (hub id, local folder, builtin:..., or an earlier run's id) without training."""
    from tasks.checks import ConfigError, check_model, check_run
    from tasks.checks_eval import check_eval_settings, check_eval_template
    from tasks.reachable import check_reachable
    from tasks.runs import model_of_run

    config = parse_config(rest)
    check_eval_settings(config)
    check_reachable(config, training=False)
    if model_of_run(config.output.artifacts_uri, config.model) is None:  # else that run's tuned model
        try:
            check_model(config.model)  # found without loading it, as `smolflow run` checks: before the flow
        except ConfigError as err:  # a bare name may have been meant as a run id: say that there is none
            if "/" in config.model or ":" in config.model:
                raise
            raise ConfigError(f"{err}; nor is it a run under {config.output.artifacts_uri} (`smolflow runs` lists "
                              "them; output.artifacts_uri picks the root)") from None
    check_eval_template(config, check_run(config).custom)
    from flows.evaluate import evaluate

    with join_running_server():
        _print(run_flow(evaluate, config))
    return 0


def cmd_validate(args: argparse.Namespace, rest: list[str]) -> int:
    """Resolve every `auto`, check config, data, model, benchmark data and custom files; run no model."""
    from tasks.checks import plan, validate_everything
    from tasks.runtime import set_torch_threads

    config = parse_config(rest)
    # As the flows do before they resolve `auto`: the CPU's bf16-vs-fp32 probe is measured (and kept) at the
    # run's thread count, so validate reports the run's own decision, and a kept probe needs no torch import.
    set_torch_threads(config.torch_threads)
    problems, resolved = validate_everything(config)
    _print({"resolved": resolved, "config": config.model_dump(mode="json"), "tasks": plan(config)})
    for problem in problems:
        what, _, message = problem.partition(": ")
        print(f"smolflow validate: {what}: {locate(rest, message)}", file=sys.stderr)
    print("OK: everything checks out" if not problems else f"{len(problems)} problem(s)", file=sys.stderr)
    return 0 if not problems else EXIT_USER_ERROR


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    """A local Prefect server (UI) plus the process that runs the deployments, until Ctrl-C; settings
    ([--config FILE] [--section.field VALUE ...]) are the nightly's and the on-demand form's, those
    under `arena` the after-nightly arena's."""
    from tasks.config_args import serve_config

    serve_config(rest)  # a bad setting: one line and exit 2 now, not a failed run every night
    # exec, not import: deployments sit above flows, and signals then reach the server's parent directly.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "deployments.local", "--port", str(args.port),
                              "--startup-timeout", str(args.startup_timeout), *rest])


def cmd_alerts(args: argparse.Namespace, rest: list[str]) -> int:
    """Create (or replace) the alert automations: a failed nightly, a rejected promotion."""
    # exec, not import: deployments sit above flows (deployments/alerts.py owns the automations).
    os.execv(sys.executable, [sys.executable, "-P", "-m", "deployments.alerts", *rest])


def cmd_gc(args: argparse.Namespace, rest: list[str]) -> int:
    """Delete old runs (keep_runs; never latest or promoted) and bound SMOLFLOW_CACHE; --dry-run only lists."""
    from tasks.gc_command import gc_command

    return gc_command(args.root, dry_run=args.dry_run, keep_runs=args.keep_runs,
                      keep_incomplete_hours=args.keep_incomplete_hours)


def cmd_arena_run(args: argparse.Namespace, rest: list[str]) -> int:
    """Arena battles between nightly models, judged, rated Bradley-Terry style (the smolflow-arena flow)."""
    from flows.arena import arena
    from tasks.arena_config import ArenaConfig
    from tasks.arena_tasks import check_arena_inputs
    from tasks.judge_backends import check_endpoint

    config = parse_config(rest, model=ArenaConfig)
    check_endpoint(config.judge)  # the arena's judge has the run judge's endpoint settings
    check_arena_inputs(config)  # docs/arena.md: prompts and models checked before the flow, as `run` does
    with join_running_server():
        _print(run_flow(arena, config))
    return 0


def cmd_arena_serve(args: argparse.Namespace, rest: list[str]) -> int:
    """The arena's vote page: two anonymous answers, A / B / tie / both bad, models revealed after."""
    from tasks.arena_page import arena_serve

    try:
        port = port_number(args.port)  # read here, not by argparse: one line, as serve's --port
    except argparse.ArgumentTypeError as err:
        raise UserError(f"argument --port: {err}") from None
    arena_serve(args.root, args.host, port)
    return 0


# ---- parser ----------------------------------------------------------------------------------

CONFIG_COMMANDS: dict[str, Callable] = {"run": cmd_run, "eval": cmd_eval, "validate": cmd_validate}
_SETTINGS = "[--config FILE] [--section.field VALUE ...]"
USAGE = {"run": f"smolflow run {_SETTINGS}", "validate": f"smolflow validate {_SETTINGS}",
         "eval": f"smolflow eval --model MODEL_OR_RUN_ID {_SETTINGS}", "arena run": f"smolflow arena run {_SETTINGS}",
         "serve": f"smolflow serve [--port PORT] [--startup-timeout SECONDS] {_SETTINGS}"}
# every night would reuse one run folder; the arena reads the nightly's root (tasks.config_args.serve_config)
NOT_SERVED = {"output": ("run_id",), "arena": ("artifacts_uri",)}
SERVE_ENV = """Environment (the first three checked before the server starts: a bad value exits 2):
  SMOLFLOW_NIGHTLY_CRON       the nightly's schedule (default: 0 2 * * *)
  SMOLFLOW_TIMEZONE           the schedule's IANA time zone (default: UTC)
  SMOLFLOW_RUN_TIMEOUT_HOURS  a served run still going after this long ends TimedOut (default: 23; 0: no limit)
  SMOLFLOW_ALERT_BLOCK        a Prefect notification block (TYPE/NAME) to alert on a failed nightly or a rejected model"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--verbose", action="store_true", help="show library logs and progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, fn in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0], add_help=False, usage=USAGE[name],
                           description=fn.__doc__ + "\n\n" + config_help(leave_out=NOT_IN_EVAL if name == "eval" else None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-h", "--help", action="help", help="list every setting")
        p.set_defaults(fn=fn, takes_settings=True)
    p = sub.add_parser("runs", help=cmd_runs.__doc__)
    p.add_argument("--root", default=DEFAULT_ROOT, help="artifact root: local path, file:// or s3:// (default %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_runs)
    p = sub.add_parser("compare", help=cmd_compare.__doc__)
    p.add_argument("run_a", help="a run id under --root (`smolflow runs` lists them)")
    p.add_argument("run_b", help="the run to compare it with")
    p.add_argument("--root", default=DEFAULT_ROOT, help="artifact root (default %(default)s)")
    p.add_argument("--all", action="store_true", help="show every setting, not only those that differ")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("promote", help=cmd_promote.__doc__)
    p.add_argument("run_id", help="a completed fine-tuning run under --root (`smolflow runs` lists them)")
    p.add_argument("--reason", required=True, help="why, kept in the pointer and shown by `smolflow runs`")
    p.add_argument("--root", default=DEFAULT_ROOT, help="artifact root (default %(default)s)")
    p.add_argument("--flow", default="smolflow-finetune", help="whose `promoted` pointer (default %(default)s)")
    p.set_defaults(fn=cmd_promote)
    p = sub.add_parser("alerts", help=cmd_alerts.__doc__, add_help=False)
    p.set_defaults(fn=cmd_alerts, takes_settings=True)  # its flags are deployments/alerts.py's (--help there)
    p = sub.add_parser("gc", help=cmd_gc.__doc__)
    p.add_argument("--root", default=DEFAULT_ROOT, help="artifact root (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted and why; delete nothing")
    p.add_argument("--keep-runs", type=int, help="completed runs to keep (default: the newest run's "
                   "output.keep_runs, else 14)")
    p.add_argument("--keep-incomplete-hours", type=float,
                   help="incomplete runs younger than this may still be running: kept (default: the newest run's "
                   "output.keep_incomplete_hours, else 24)")
    p.set_defaults(fn=cmd_gc)
    arena = sub.add_parser("arena", help="blind battles between models: run the arena flow, or serve its vote page")
    arena_sub = arena.add_subparsers(dest="arena_command", metavar="ARENA_COMMAND", required=True)
    from tasks.arena_config import ArenaConfig

    p = arena_sub.add_parser("run", help=cmd_arena_run.__doc__, add_help=False, usage=USAGE["arena run"],
                             description=cmd_arena_run.__doc__ + "\n\n"
                             + config_help(ArenaConfig, example="judge: {enabled: false}"),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="help", help="list every setting")
    p.set_defaults(fn=cmd_arena_run, takes_settings=True)
    p = arena_sub.add_parser("serve", help=cmd_arena_serve.__doc__)
    p.add_argument("--root", default=DEFAULT_ROOT, help="artifact root the arena flow wrote to (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", default="7860",
                   help="port of the vote page (default %(default)s); a busy port exits 2")
    p.set_defaults(fn=cmd_arena_serve)
    p = sub.add_parser("serve", help=cmd_serve.__doc__, usage=USAGE["serve"],
                       description=(f"{inspect.cleandoc(cmd_serve.__doc__)}\n\n{SERVE_ENV}\n\n"
                                    f"{config_help(ServeConfig, leave_out=NOT_SERVED)}"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    # Checked by deployments/local.py, which this execs: one line, as for its other arguments.
    p.add_argument("--port", default="4200",
                   help="port of the Prefect server and UI (default %(default)s); a busy port exits 2")
    p.add_argument("--startup-timeout", default="300", metavar="SECONDS",
                   help="seconds to wait for the server to answer (default %(default)s; its first start sets up the database)")
    p.set_defaults(fn=cmd_serve, takes_settings=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    env_defaults()  # before anything imports prefect
    own_temp_root()  # before anything imports wandb: a SIGKILLed run's temporary files go with the next start
    program = argv is None  # the `smolflow` command, not a caller passing its own arguments
    if program:
        from tasks.leftovers import exit_on_termination

        _safe_streams()  # the process's own streams; a caller's stay as it set them
        exit_on_termination()  # `kill` stops a run as Ctrl-C does: its temporary server stops with it
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    from tasks.console import configure_logging

    if verbose:
        os.environ["SMOLFLOW_VERBOSE"] = "1"  # the flow (and its subprocesses) read it too
    # Every command quiet unless --verbose (validate and eval read data and load models before any flow).
    configure_logging(True if verbose else None)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_settings", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.fn(args, rest)
    except (UserError, ValueError, FileNotFoundError) as err:
        if debug:
            raise
        message = str(err) if isinstance(err, UserError) else locate(rest, str(err))
        command = " ".join(filter(None, (args.command, getattr(args, "arena_command", None))))
        print(f"smolflow {command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # stdout's reader left (`smolflow runs | head -1`): end quietly as commands stopped by SIGPIPE do,
        # with stdout on /dev/null so the interpreter's last flush cannot raise again (Python docs,
        # "Note on SIGPIPE"). Only the command's own stdout: a caller's streams stay as it set them.
        if debug or not program:
            raise
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poll.poll(0)):  # Linux: a pipe without reader
            raise  # a broken pipe elsewhere (a socket), while stdout is still read: an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as err:  # tasks.storage's StorageError: S3 credentials, endpoint or bucket to fix
        storage = sys.modules.get("tasks.storage")  # imported by the commands that use it, not here
        if debug or storage is None or not isinstance(err, storage.StorageError):
            raise
        print(f"smolflow {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FlowFailed as err:
        if debug:
            raise
        print(f"smolflow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if program:
            # The interpreter's last garbage collections walk every object torch, transformers,
            # Prefect and W&B made (~2.5 s of a ~3 s exit with them imported, 1.5 s of a cached
            # re-run here): frozen, they are skipped. atexit handlers, thread joins and stream
            # flushes still run. Only in the `smolflow` process itself, never in a caller's.
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
