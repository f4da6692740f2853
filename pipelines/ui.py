"""`make ui`: the MLflow UI for this project's store, on 127.0.0.1 only."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from lipforcing.config import ConfigError, load_config
from pipelines.tracking import DEFAULT_ROOT, EXPERIMENT, default_tracking_uri, runs_page, setup_tracking


@dataclass
class UIConfig:
    port: int = 5000
    host: str = "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(UIConfig, overrides=list(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    store = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(DEFAULT_ROOT)
    if store.startswith("sqlite:///") and not os.path.exists(store.removeprefix("sqlite:///")):
        print(f"no MLflow store yet at {store}: run `make demo` or a job first", file=sys.stderr)
        return 1
    experiment = setup_tracking()  # the same store: MLFLOW_TRACKING_URI, else the default one
    address = runs_page(f"http://{config.host}:{config.port}", experiment)
    print(f"MLflow UI for {store}: the runs of '{EXPERIMENT}' are at {address}", flush=True)
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    command = [mlflow, "ui", "--backend-store-uri", store, "--host", config.host, "--port", str(config.port)]
    os.execv(mlflow, command)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
