"""smolflow's pipeline stages, one module per stage; each exposes Prefect tasks."""
