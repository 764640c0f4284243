"""The tracking layer's names: the tags and params it writes on runs, and its timing constants."""

from __future__ import annotations

import re


TAG_STAGE = "argse.stage"
TAG_DATASET = "argse.dataset"
TAG_CODE = "argse.code_version"
TAG_HASH = "argse.config_hash"
TAG_OWNER = "argse.owner"  # host/pid/start time of the process working on the run
TAG_HEARTBEAT = "argse.heartbeat"  # unix time of that process's last sign of life
TAG_FAILURE = "argse.failure"  # why the run ended FAILED, one line
TAG_LAUNCHED = "argse.launched"  # on a run `mlflow run` made outside the home experiment: "<experiment>/<run id>" of the stage's run
TAG_RESUMABLE = "argse.resumable"  # "false": it failed for a reason a resume cannot fix
CLAIM_PARAM = "argse.resume."  # + n: the n-th process that took the unfinished run over, "<owner>@<time>"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0  # no heartbeat for this long: the process working on the run is gone
SERVER_LOST_AFTER_S = 15.0  # no heartbeat got through for this long: the stage stops
SYSTEM_METRICS_S = 3  # seconds between two samples of an expert run's system metrics
HTTP_TIMEOUT_S = 10  # MLflow's per-request timeout (one retry), unless MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise
DEFAULT_EXPERIMENT_ID = "0"
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
