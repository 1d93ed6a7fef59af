"""A user's job that holds its deployment's concurrency slot while it runs."""

import time

from prefect import flow


@flow(name="hold-slot")
def hold_slot(seconds: float = 600.0) -> None:
    time.sleep(seconds)
