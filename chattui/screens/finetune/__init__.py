"""The fine-tune screen: the jobs list beside either the new-job form or a job's view; Compare opens over it.

Jobs run as detached processes (chattui.jobs): the UI only writes the job's folder and then tails its
progress.jsonl on a timer, so training never blocks or crashes the UI, and closing the app leaves jobs
running; reopening lists them again from the store (the jobs table) and the job folders.

The widgets (form.py, job_view.py) post what the user asks for; this screen does it, with what its
ScreenContext gives (the store, the model state, loading a model, a new chat).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import ContentSwitcher, Footer

from chattui import jobs
from chattui.context import ScreenContext
from chattui.notices import store_errors_as_notices
from chattui.screens.finetune.compare import CompareScreen
from chattui.screens.finetune.form import FinetuneForm
from chattui.screens.finetune.job_view import JobList, JobView

POLL_S = 0.5  # how often running jobs' progress files are read


class FinetuneScreen(Screen):
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]  # chattui.tcss narrows the columns below 120
    BINDINGS = [
        Binding("escape", "back", "Back to chat"),
        Binding("ctrl+n", "new_job", "New job"),
    ]

    @dataclass
    class Resumed(Message):
        job_id: str
        state: jobs.JobState | None
        error: str | None = None

    def __init__(self, context: ScreenContext) -> None:
        super().__init__()
        self.context = context
        self.jobs_dir = Path(context.jobs_dir) if context.jobs_dir else jobs.jobs_root()
        self.current: str | None = None  # the job shown

    def compose(self):
        with Horizontal(id="ft-body"):
            yield JobList(self.context.store, self.jobs_dir, id="ft-jobs")
            with ContentSwitcher(id="ft-main", initial="ft-form"):
                yield FinetuneForm(self.context.model.path if self.context.model else None, id="ft-form")
                yield JobView(id="ft-job")
        yield Footer()

    def on_mount(self) -> None:
        self.job_list.load()
        self.set_interval(POLL_S, self.poll)

    @property
    def job_list(self) -> JobList:
        return self.query_one(JobList)

    @property
    def job(self) -> jobs.JobState | None:
        """The state of the job shown, if one is."""
        return self.job_list.states.get(self.current) if self.current else None

    def poll(self) -> None:
        self.job_list.poll(self.current)
        self._redraw()

    @store_errors_as_notices
    def _redraw(self) -> None:
        if self.job is not None:
            self.query_one(JobView).show(self.job, self.job_list.title_of(self.current))

    def show_job(self, job_id: str) -> None:
        if job_id not in self.job_list.states:
            self.notify(self.job_list.missing.get(job_id, "the job folder cannot be read"), title="Job",
                        severity="error", markup=False)
            return
        self.current = job_id
        self.query_one("#ft-main", ContentSwitcher).current = "ft-job"
        self._redraw()

    def on_job_list_chosen(self, message: JobList.Chosen) -> None:
        self.show_job(message.job_id)

    def on_job_list_new_job_requested(self, message: JobList.NewJobRequested) -> None:
        self.action_new_job()

    def action_new_job(self) -> None:
        self.current = None
        self.query_one("#ft-main", ContentSwitcher).current = "ft-form"
        self.query_one(FinetuneForm).focus_model()

    def action_back(self) -> None:
        self.app.pop_screen()

    # -- what the form asks for --------------------------------------------------------------------------

    def on_finetune_form_choose_model_requested(self, message: FinetuneForm.ChooseModelRequested) -> None:
        self.context.choose_model(message.current, self.query_one(FinetuneForm).set_model)

    @store_errors_as_notices
    def on_finetune_form_start_requested(self, message: FinetuneForm.StartRequested) -> None:
        try:
            state = jobs.start_job(message.config, root=self.jobs_dir)
        except jobs.JobError as e:
            self.query_one(FinetuneForm).show_errors({"start": f"Could not start the job: {e}"})
            return
        self.job_list.add(state)
        self.show_job(state.id)
        self.notify(f"Training in {state.dir}; it keeps running if you close chattui.", title="Job started",
                    markup=False)

    # -- what the job view asks for ----------------------------------------------------------------------

    def on_job_view_cancel_requested(self, message: JobView.CancelRequested) -> None:
        if jobs.cancel_job(message.state):
            self.notify("The job finishes its step, writes a checkpoint and stops.", title="Cancelling",
                        markup=False)
        else:
            self.notify("The job is not running.", title="Cancel", severity="warning", markup=False)

    def on_job_view_resume_requested(self, message: JobView.ResumeRequested) -> None:
        self._resume(message.state.id, message.state.dir)

    @work(thread=True, group="resume")
    def _resume(self, job_id: str, job_dir: Path) -> None:
        try:
            self.post_message(self.Resumed(job_id, jobs.resume_job(job_dir)))
        except jobs.JobError as e:
            self.post_message(self.Resumed(job_id, None, str(e)))

    @store_errors_as_notices
    def on_finetune_screen_resumed(self, message: Resumed) -> None:
        if message.state is None:
            self.notify(message.error, title="Cannot resume", severity="error", markup=False)
            return
        self.job_list.replace(message.state)
        if self.current == message.job_id:
            self._redraw()

    async def on_job_view_chat_requested(self, message: JobView.ChatRequested) -> None:
        """Back to the chat, in a new conversation, with the job's result loaded."""
        if not self.context.is_loaded(message.model, message.adapter):
            self.context.load_model(message.model, adapter=message.adapter)
        await self.context.open_new_chat()

    def on_job_view_compare_requested(self, message: JobView.CompareRequested) -> None:
        self.app.push_screen(CompareScreen(self.context, message.model, message.adapter))
