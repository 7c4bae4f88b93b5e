"""One source of defaults for sampling: the command line reads them from here, and so do the functions behind
it (`Pipeline.generate_samples`, `TraceSettings`, `eval_checkpoint`, the experiments). Torch-free, so that
the CLI can parse before anything heavy is imported. Training's defaults are `ecviz.train.TrainConfig`'s."""

STEPS = 25  # Euler steps of the sampler
GUIDANCE = 4.0  # classifier-free guidance scale (--guidance; 1: off)
SEED = 0  # run seed: sample i's noise comes from (seed, i) alone
TRACE_BATCH = 8  # samples per batch of `ecviz trace` and `ecviz sample` (rounded up to whole routing groups)
EVAL_BATCH = 16  # samples per batch of `ecviz eval`
TRACE_IMAGES_PER_PROMPT = 1
EVAL_IMAGES_PER_PROMPT = 4  # ShapesEval: four images per prompt, as GenEval
GRID_PROMPTS = 12  # prompts in `ecviz eval --grid`, spread over the categories
