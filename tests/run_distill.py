"""Helper of tests/test_distributed.py: run one distillation with the Trainer, then dump every tensor of
this process's final training state (networks, optimizers, EMA, objective) to
``DUMP_DIR/rank{k}.safetensors``, keyed by its path in ``Trainer.state()``.

    accelerate launch --multi_gpu --num_processes 2 tests/run_distill.py DUMP_DIR key=value ...
"""

import sys
from pathlib import Path

from probes import register
from safetensors.torch import save_file

from fastgen.checkpoint import flatten_state
from fastgen.config import DistillConfig, load_config
from fastgen.trainer import Trainer


def main(argv: list[str]) -> int:
    dump = Path(argv[0])
    register()  # the engine's probe objectives (tests/probes.py), beside the package's own
    trainer = Trainer(load_config(DistillConfig, None, argv[1:]))
    trainer.fit()
    acc = trainer.accelerator
    tensors, _ = flatten_state(trainer.state())
    dump.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dump / f"rank{acc.process_index}.safetensors"),
              metadata={"num_processes": str(acc.num_processes), "step": str(trainer.step)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
