"""`python -m neuroflow_dagster.cli`: the same as the `neuroflow` console script."""

import sys

from neuroflow_dagster.cli.app import main

sys.exit(main())
