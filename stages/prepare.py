"""DVC stage: load the raw dataset, hold out the validation set, save the splits as tensors."""

from lth.pipeline import numerics

numerics.pin()  # before torch is imported: ATen, MKL and oneDNN choose their kernels at start-up

from pathlib import Path  # noqa: E402

from lth.core.data import data_root, prepare, prepared_path  # noqa: E402
from lth.pipeline import stage  # noqa: E402
from lth.pipeline.workspace import DATA_DIR  # noqa: E402


def main() -> None:
    hp = stage.load().hp
    sizes = prepare(hp.dataset, prepared_path(Path(DATA_DIR), hp.dataset), data_root())
    print(f"lth: prepared {hp.dataset.name}: {sizes}")


if __name__ == "__main__":
    stage.run(main)
