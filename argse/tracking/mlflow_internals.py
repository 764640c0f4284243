"""The one place that uses MLflow internals (no public API does what is needed):
``tests/test_tracking.py`` fails when MLflow changes what this relies on."""

from __future__ import annotations


def post_set_tag(uri: str, run_id: str, key: str, value: str, *, timeout: float) -> None:
    """Set a tag on a run of the HTTP tracking server at ``uri`` with one request: no retry, no back-off,
    ``timeout`` seconds. MlflowClient would retry for as long as MLFLOW_HTTP_REQUEST_MAX_RETRIES says;
    the heartbeat must rather fail fast and try again at its next beat."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    endpoint = "/api/2.0/mlflow/runs/set-tag"
    response = http_request(get_default_host_creds(uri), endpoint, "POST", max_retries=0, backoff_factor=0,
                            backoff_jitter=0, timeout=timeout, json={"run_id": run_id, "key": key, "value": value})
    verify_rest_response(response, endpoint)
