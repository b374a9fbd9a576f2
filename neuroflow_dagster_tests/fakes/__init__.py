"""Test doubles for what does not exist on the test machines: a Docker engine and Apptainer."""
