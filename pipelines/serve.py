"""Run the pipeline on a schedule: a Prefect deployment of the ``arvision`` flow, served from
this process (``flow.serve``) with a cron schedule.

``arvision serve-flow --cron "0 3 * * *"`` serves until stopped (Ctrl-C). It needs a Prefect
server (``prefect server start``, then ``PREFECT_API_URL``): the server's scheduler creates the
runs, which the temporary server of ``arvision run`` does not do.
Each scheduled run is an ordinary ``arvision run`` of the repo: DVC skips what is unchanged
and the repo lock keeps it from overlapping a run started by hand.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from pipelines.run import arvision_flow

DEPLOYMENT = "arvision-scheduled"


def serve(root: Path, cron: str, name: str = DEPLOYMENT) -> None:
    """Serve the flow for ``root`` on the ``cron`` schedule (blocks until interrupted)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from arvision.errors import UserError
    from pipelines.preflight import check_prefect

    try:
        CronSchedule(cron=cron)
    except ValidationError as err:
        why = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"--cron {cron!r}: not a cron expression ({why})") from None
    if not PREFECT_API_URL.value():
        raise UserError(
            "serve-flow needs a Prefect server, which creates the scheduled runs: start one "
            "(`prefect server start`) and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    check_prefect()
    # Prefect's runner stops cleanly on SIGTERM (ending the flow run in progress), while the
    # KeyboardInterrupt of Ctrl-C got lost in its event loop: Ctrl-C is turned into SIGTERM
    interrupted = []

    def on_sigint(signum, frame) -> None:
        interrupted.append(signum)
        os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        arvision_flow.serve(name=name, cron=cron, parameters={"root": str(Path(root).resolve())},
                            description=f"arvision pipeline of {Path(root).resolve()} on '{cron}'")
    except SystemExit:  # the runner's SIGTERM handler before it has started
        if not interrupted:
            raise
    finally:
        signal.signal(signal.SIGINT, old)
    if interrupted:
        raise KeyboardInterrupt
