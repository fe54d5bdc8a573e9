"""The bundled demo's settings: the tiny model learns in seconds on CPU with far larger learning rates than the
paper's for an 8B model."""

TINY_DEMO_PRESET = "tiny-demo"
"""The `sdpo-fast train` preset applied when neither a model nor a preset is given."""
TINY_DEMO_TRAIN = dict(  # lr 1e-3 collapsed full fine-tuning into "s s s ..." replies; 1e-4 learns without it
    loss="sdpo", batch_size=16, lr=1e-4, epochs=3, max_steps=None, warmup_ratio=0.0, schedule="constant",
    optimizer="adamw", weight_decay=0.0,
)


def online_demo_settings(flip: bool) -> dict:
    """OnlineConfig values of `sdpo-fast demo` (and `--flip`) unless given on the command line (signal_clip:
    OnlineConfig's "auto", 2.0 in sampled_token mode)."""
    return dict(update_every=4, lr=1e-3 if flip else 2e-3, lora_r=8, lora_alpha=16.0,
                max_new_tokens=96 if flip else 48)
