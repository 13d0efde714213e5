"""smolflow's pipeline stages, one module per stage; each exposes Prefect tasks."""

from tasks.ast_retry import retry_spurious_ast_errors
from tasks.parent_death import temporary_servers_die_with_parent

# Before anything here can start Prefect's temporary server (every smolflow process imports this
# package first: the CLI, the flows, Prefect's flow-run processes, Ray's workers): a SIGKILLed
# process's server dies with it instead of living on, orphaned, until the next run reaps it.
temporary_servers_die_with_parent()

# A CPython 3.11.0-3.11.7 race (gh-106905) made `ast.parse` fail at random beside Prefect's threads.
retry_spurious_ast_errors()
