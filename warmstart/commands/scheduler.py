"""``warmstart scheduler``: the Triton-protocol router in front of many Triton servers."""

from __future__ import annotations

import argparse

HELP = "run the scheduler: KServe v2 gRPC/HTTP + OpenAI front ends routing to many Triton servers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from warmstart.scheduler.service import add_arguments as scheduler_arguments

    scheduler_arguments(p)


def run(args: argparse.Namespace) -> int:
    from warmstart.scheduler.service import run as run_scheduler

    return run_scheduler(args)
