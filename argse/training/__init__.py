"""Training code without MLflow or the CLI's config: the experts' losses (`losses`), temperature
calibration (`calibration`), the gating network's training loops (`gating`) and the device, precision
and checkpoint helpers (`utils`). The stages in `argse.stages` build the inputs and track the runs."""
