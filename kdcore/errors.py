"""User-facing errors: one sentence that names the problem and the fix.

The CLI prints a :class:`KdError` without a traceback and exits non-zero; anything else is a bug.
"""


class KdError(Exception):
    """A problem the user can fix (bad input, missing plugin, mismatched models...)."""


class PluginError(KdError):
    """A strategy name that is unknown, duplicated, or provided by a broken plugin."""


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM stopped a run after its checkpoint was written; the CLI exits with 128 + signal.

    A BaseException, like KeyboardInterrupt: a stop the user asked for is not a failure to catch
    with ``except Exception``.
    """

    def __init__(
        self,
        step: int,
        signum: int,
        run_dir: object,
        main_process: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.step, self.signum, self.run_dir = step, signum, run_dir
        self.exit_code = 128 + int(signum)  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them
        self.main_process = main_process
        if resume_step is None or resume_step == step:
            message = f"stopped at step {step}; resume with: kd run --resume {run_dir}"
        else:  # a second Ctrl-C: no checkpoint at this step
            message = (
                f"stopped at step {step} without a checkpoint; resume from step {resume_step} with: "
                f"kd run --resume {run_dir}"
            )
        super().__init__(message)
