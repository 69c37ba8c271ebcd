"""Jobs: the main job, data-set agnostic: its command (`main`), its stages (`stages`), the order
they run in and what each is made from (`plan`), and running them one after another or side by
side (`run`); and what each data set brings (`shapes`, `emoji`, and `own` for pictures of your
own: its shards, component configs, grid prompts and evaluation)."""
