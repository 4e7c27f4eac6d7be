"""DVC stage: load the raw dataset, hold out the validation set, save the splits as tensors."""

from pathlib import Path

from lth.core.data import data_root, prepare, prepared_path
from lth.pipeline import stage
from lth.pipeline.workspace import DATA_DIR


def main() -> None:
    hp = stage.load().hp
    sizes = prepare(hp.dataset, prepared_path(Path(DATA_DIR), hp.dataset), data_root())
    print(f"lth: prepared {hp.dataset.name}: {sizes}")


if __name__ == "__main__":
    stage.run(main)
