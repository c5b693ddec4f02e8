"""Train the built-in digits model: ``python -m jobs.train [config.yaml] key=value ...``.

The committed weights in ``pipeline/models/weights/`` were made with
``python -m jobs.train jobs/configs/train_digits.yaml``.

``python -m jobs.train reward [OUT.safetensors]`` trains the ``digits`` reward's classifier
(``pipeline.rewards``); the shipped ``digits-reward.safetensors`` was made by that command.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_train_config, to_dict
from pipeline.models import digits, digits_train


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reward":
        out = Path(argv[1]) if len(argv) > 1 else digits.WEIGHTS_DIR / "digits-reward.safetensors"
        net, meta = digits_train.train_reward_classifier()
        digits_train.save_reward_classifier(net, out, meta)
        logging.info("wrote %s (held-out accuracy %.4f on %d real digits)", out, meta["holdout_accuracy"],
                     meta["holdout_images"])
        return 0
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        cfg = load_train_config(path, argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    net_cfg = digits.DigitsNetConfig(resolution=cfg.resolution, channels=cfg.channels, emb_dim=cfg.emb_dim)
    net, meta = digits_train.train(net_cfg, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                             label_dropout=cfg.label_dropout, p_mean=cfg.p_mean, p_std=cfg.p_std,
                             ema_decay=cfg.ema_decay, seed=cfg.seed, threads=cfg.threads)
    digits_train.save(net, Path(cfg.out), {**meta, "train_config": to_dict(cfg)})
    logging.info("wrote %s/digits.safetensors (final loss %.4f, %.0fs)", cfg.out, meta["final_loss"], meta["train_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
