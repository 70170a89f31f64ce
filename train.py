"""Train the CIFAR-10 convolutional autoencoder.

    accelerate launch [--config_file accelerate_config.yaml] train.py [--data DIR] [--out OUT] [flags]
    python train.py [--data DIR] [--out OUT] [flags]      # one device, no launcher

--data (default data/cifar10) is prepared first when it holds no data: from --source, else
$CIFAR_SOURCE, else a torchvision download. Rerunning the same command with the same --out
(default runs/cifar10) resumes from the latest checkpoint.
`python train.py --help` lists the flags; the defaults are the study's recipe.
"""

import os
import time

STARTED = time.perf_counter()

from ae.interrupt import stop_on_signals  # noqa: E402

stop_on_signals()  # first: Ctrl-C during the imports below is one line, not a traceback

from ae.environment import check_at_start_up, check_wandb_folders  # noqa: E402

check_at_start_up(train=True)  # before anything reads LOCAL_RANK, OMP_NUM_THREADS, ...

from ae.launch import (  # noqa: E402
    end_with_parent,
    exit_without_finalizing,
    relaunch_cpu_processes_if_needed,
)

end_with_parent()  # no orphaned trainers: a launcher's child ends when the launcher does
relaunch_cpu_processes_if_needed()  # before the heavy imports: it may replace this process

from ae.allocator import keep_step_buffers  # noqa: E402

keep_step_buffers()  # steady CPU step time: a step's buffers are reused, not page-faulted in anew

from ae.config import parse_args  # noqa: E402
from ae.errors import friendly_errors  # noqa: E402
from data_prep.missing import prepare_if_missing  # noqa: E402


def _say(message: str) -> None:
    print(f"[cae-train] {message}", flush=True)


@friendly_errors
def main() -> None:
    cfg = parse_args()  # bad flags fail fast, before the heavy imports below
    check_wandb_folders(cfg.wandb_mode)
    # Before the process group forms: a long download must not run into --dist-timeout.
    prepare_if_missing(cfg.data, cfg.source, preparer=os.environ.get("LOCAL_RANK", "0") == "0", log=_say)
    from ae.trainer import Trainer

    Trainer(cfg, started=STARTED).fit()


if __name__ == "__main__":
    main()
    exit_without_finalizing()  # a finished run is not failed by gloo's threads at interpreter exit
