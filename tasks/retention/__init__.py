"""The parts of the `retention` flow.

`parameters` validates what the user asked for; `policy` decides, run by run and tree by
tree, what may go; `selection` picks the engine and finds the expired top-level runs in
batches; an engine deletes each batch (`sql_engine` straight in the database, the only
module that writes to Prefect's tables; `api_engine` through the Prefect API); `purge`
holds the flow's tasks and the batch loop; `rate_limit` paces it; `report` says what
happened.
"""
