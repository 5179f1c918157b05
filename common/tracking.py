"""W&B for every stage: offline by default (no account, no network; `wandb sync` later), disabled in tests."""

import os

from common.dist import is_master


class DummyWandb:
    """Non-master ranks (and --wandb-mode disabled): every call is a no-op."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def add_wandb_args(parser):
    parser.add_argument("--wandb-mode", default=os.environ.get("WANDB_MODE", "offline"),
                        choices=["offline", "online", "disabled"], help="W&B mode (offline needs no network)")
    parser.add_argument("--wandb-project", default="llama-nemotron-mini")
    parser.add_argument("--run-name", default=None)


def init_wandb(project: str, name: str, config: dict, mode: str = "offline", master: bool | None = None,
               dir: str | None = None):
    """A real wandb Run on the master rank (default: is_master(), so call after compute_init), else a DummyWandb."""
    if master is None:
        master = is_master()
    if not master or mode == "disabled":
        return DummyWandb()
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    return wandb.init(project=project, name=name, config=config, mode=mode, dir=dir or os.getcwd(), reinit="finish_previous")


def wandb_table(columns, rows):
    """A wandb.Table of completions (prompt, response, reward...) for the RL/SFT stages."""
    import wandb
    return wandb.Table(columns=columns, data=[list(r) for r in rows])
