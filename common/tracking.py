"""W&B for every stage: offline by default (no account, no network; `wandb sync` later), disabled in tests."""

import os


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


def init_wandb(project: str, name: str, config: dict, mode: str = "offline", master: bool = True, dir: str | None = None):
    if not master or mode == "disabled":
        return DummyWandb()
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb
    return wandb.init(project=project, name=name, config=config, mode=mode, dir=dir or os.getcwd(), reinit="finish_previous")


def wandb_table(columns, rows):
    """A wandb.Table of completions (prompt, response, reward...) for the RL/SFT stages."""
    import wandb
    return wandb.Table(columns=columns, data=[list(r) for r in rows])
