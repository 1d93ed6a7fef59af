"""The parts of the `retention` flow.

`parameters` validates what the user asked for; `policy` decides, run by run and tree by
tree, what may go; `selection` picks the engine and finds the expired top-level runs in
batches; an engine (`engine` says what every engine does) deletes each batch: the SQL
engine straight in the database (`sql_engine` the runs' trees, `sql_housekeeping` old
events, orphans and VACUUM, `sql_archive` a batch's rows read for the archive and restored,
all on `sql_database`: the only modules that write to Prefect's tables), `api_engine`
through the Prefect API (`api_archive` its batch's rows for the archive); `archive` writes
and verifies each batch's file before its deletes (`archive_to`); `purge` holds the flow's
tasks and the batch loop; `rate_limit` paces it; `report` says what happened.
"""
