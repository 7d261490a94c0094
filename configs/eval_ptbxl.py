"""PTB-XL evaluation suite for `python -m clef_jax.evaluate --config configs/eval_ptbxl.py`.

The authors' downstream protocol (docs/design.md): strat_fold 1-8 / 9 / 10, lead I (the
abstract; their code uses lead II), linear probe here (`:finetune` for full fine-tuning).
"""

import ml_collections


def get_config(arg: str = "linear_probe") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "tasks": ["superdiagnostic", "subdiagnostic", "diagnostic", "form", "rhythm", "all",
                  "sex", "age"],
        "protocol": arg or "linear_probe",
        "lead": "I",
        "seed": 0,
        "bootstrap": 1000,
        "random_baseline": True,
        "finetune": {"max_epochs": 50, "patience": 5, "batch_size": 64,
                     "learning_rate": 1e-3, "weight_decay": 1e-5},
    })
