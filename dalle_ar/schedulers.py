"""The diffusion noise schedules of the continuous-diffusion components (the prior, the
upsampler): diffusers' DDPM for training (`add_noise`, Ho et al. 2020) and DDIM for sampling
(Song et al. 2021), built from one component config's fields so both agree. Kept apart from the
networks they drive, as diffusers does."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler


def train_scheduler(
    num_train_timesteps: int, beta_schedule: str, prediction_type: str, clip_sample: bool
) -> DDPMScheduler:
    """The training schedule: `add_noise` at integer timesteps in [0, num_train_timesteps)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=clip_sample)  # fmt: skip


def sample_scheduler(
    num_train_timesteps: int, beta_schedule: str, prediction_type: str, clip_sample: bool
) -> DDIMScheduler:
    """The sampling schedule (DDIM, eta = 0 in `step`). `set_alpha_to_one`: the last step lands
    on the predicted x0 itself. "trailing" spacing starts at the last training timestep, the one
    whose noise is closest to pure (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", table 2)."""
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=clip_sample,
                         set_alpha_to_one=True, timestep_spacing="trailing")  # fmt: skip
