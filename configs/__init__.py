"""The shipped experiment configs, one `get_config()` module each (an installed package, so a
config of your own can start from one: `from configs import quickstart`). The programs load
them by path from any folder: `--config configs/quickstart.py` (`experiments.cli.config_path`).
"""
