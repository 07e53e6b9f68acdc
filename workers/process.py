"""Kept for deployed manifests and scripts that start `python -m varco.workers.process`: the worker
process now lives in `varco.workers.runtime.main`."""

from varco.workers.runtime.main import main

if __name__ == "__main__":
    main()
