"""The noise schedules and samplers of the diffusion layer; defined in :mod:`common.models.noise_schedule` so that a
generator folder (:mod:`common.models.generator`, a lower layer) can save and load its schedule."""

from common.models.noise_schedule import (
    BETA_END_T1000,
    BETA_START_T1000,
    SCHEDULE_KEYS,
    AnyScheduler,
    make_scheduler,
    training_schedule,
)

__all__ = ["BETA_END_T1000", "BETA_START_T1000", "SCHEDULE_KEYS", "AnyScheduler", "make_scheduler",
           "training_schedule"]
