"""Jobs: the main job's stages (`main`), data-set agnostic, and what each data set brings
(`shapes`: its shards, component configs, grid prompts and evaluation)."""
