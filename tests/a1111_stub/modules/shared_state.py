"""Stand-in for modules.shared_state.State: job timestamp, interrupt/skip flags, begin/end."""
import itertools

_jobs = itertools.count(1)


class State:
    interrupted = False
    skipped = False
    job = ""
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0

    def interrupt(self):
        self.interrupted = True

    def begin(self, job="(unknown)"):
        self.job, self.job_timestamp = job, f"job-{next(_jobs)}"
        self.interrupted = self.skipped = False

    def end(self):
        self.job = ""
