"""One console for the whole CLI; quiet on non-main processes of a distributed run."""

from __future__ import annotations

import os

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def log(msg: str) -> None:
    if is_main_process():
        console.print(msg)


def quiet_libraries() -> None:
    """Our progress line and messages replace the libraries' bars and advisory warnings."""
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


err = Console(stderr=True, highlight=False, soft_wrap=True)  # error messages, on every rank
