"""Old flow runs out of a temporary Prefect server's database (`smolflow run` without a server).

`tasks/runtime.py` enables Prefect's flow-run vacuum (PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED has
`flow_runs`): finished flow runs, with their task runs, states, logs and artifacts, are deleted
after the retention period (90 days). But Prefect runs that service only in a real server: the
temporary server a run without PREFECT_API_URL starts is "ephemeral", where only the events vacuum
runs. A nightly from cron therefore kept every night's flow run in PREFECT_HOME/prefect.db for good
(~0.2 MB a night here on a tiny model, more with real logs), while the docs said it levels off at
90 days. Such a run now applies the same vacuum (Prefect's own function, same settings) itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading

TIMEOUT_S = 120


def vacuum_temporary_server_db() -> bool:
    """Delete flow runs past the vacuum's retention period from the database of a temporary
    server, as a real server's vacuum service does. True when it ran; never fails the run."""
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value():
        return False  # a real server (`smolflow serve`, a shared one) runs its own vacuum service
    settings = get_current_settings().server.services.db_vacuum
    if "flow_runs" not in settings.enabled_vacuum_types:
        return False  # the user turned it off: keep every flow run, as a server would
    outcome: list[bool] = []

    async def vacuum_and_close() -> None:
        from prefect.server.database import provide_database_interface
        from prefect.server.services.db_vacuum import vacuum_old_flow_runs

        db = provide_database_interface()
        try:
            await vacuum_old_flow_runs(db=db)
        finally:
            # Closed here, not left to Prefect's disposal at loop shutdown: aiosqlite's connection
            # threads are not daemons, and one left open would keep the process from exiting.
            await (await db.engine()).dispose()

    def vacuum() -> None:
        try:
            asyncio.run(vacuum_and_close())  # a loop of its own: a flow body may already be inside one
            outcome.append(True)
        except Exception as err:  # a locked or older-schema database: next night tries again
            logging.getLogger("smolflow").warning("Prefect database vacuum skipped: %s: %s", type(err).__name__, err)

    worker = threading.Thread(target=vacuum, name="smolflow-prefect-vacuum", daemon=True)
    worker.start()
    worker.join(TIMEOUT_S)  # a database held by another writer must not hold the run up
    if worker.is_alive():
        logging.getLogger("smolflow").warning("Prefect database vacuum still busy after %d s; the run goes on", TIMEOUT_S)
    return bool(outcome)
