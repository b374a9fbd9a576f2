"""The one resource every asset uses: the validated neuroflow configuration."""

from __future__ import annotations

from functools import lru_cache

import dagster as dg

from neuroflow_dagster.config import NeuroflowConfig, load_config


@lru_cache(maxsize=8)
def _load(config_file: str) -> NeuroflowConfig:
    return load_config(config_file)


class NeuroflowResource(dg.ConfigurableResource):
    """Points at neuroflow.yaml; run workers load (and validate) the same file the code location did."""

    config_file: str

    def load(self) -> NeuroflowConfig:
        return _load(self.config_file)
