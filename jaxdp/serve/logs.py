"""One logging set-up for the server and its workers: INFO and above, each line with the time,
level and process; job lines name the job and its tenant (`job_extra`)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s"


def configure(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT, force=True)
    logging.getLogger("jaxdp").setLevel(level)
