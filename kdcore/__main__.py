"""``python -m kdcore`` is the ``kd`` CLI (``accelerate launch -m kdcore`` and torchrun use this)."""

from kdcore.cli import main

if __name__ == "__main__":
    main()
