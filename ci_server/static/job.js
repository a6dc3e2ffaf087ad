// One job's page: its facts, its output live from the events stream, cancel and download.
//
// The output is replayed from the job's first event whenever the page opens (a reload
// included), then followed live; a dropped stream is resumed by JobEvents with Last-Event-ID.
// The view follows the tail of the output until the user scrolls up, and again once they
// scroll back to the bottom or press "Follow output".

import { cancelJob, eventsUrl, getJob } from "./api.js";
import { AnsiLog } from "./ansi.js";
import { JobEvents } from "./events.js";
import { durationMs, formatDuration, formatTime, resultLine, TERMINAL } from "./format.js";

const TICK_MS = 1000;
const BOTTOM_SLACK_PX = 4;
const STAGE = { queued: 0, running: 1, completed: 2, failed: 2, cancelled: 2 };
const STREAM_STATES = {
  connecting: "connecting…",
  live: "● live",
  reconnecting: "connection lost; reconnecting…",
  ended: "",
};

export class JobView {
  constructor(els, { onError, onMissing }) {
    this.els = els; // section, id, status, start, end, duration, result, cancel, download,
    //                 follow, stream, log
    this.onError = onError;
    this.onMissing = onMissing;
    this.events = null;
    this.ticker = null;
    this.generation = 0;
    this.scrollPending = false;
    els.log.addEventListener("scroll", () => this.onScroll());
    els.follow.addEventListener("click", () => this.follow(true));
    els.cancel.addEventListener("click", () => this.cancel());
    els.download.addEventListener("click", () => this.download());
  }

  async show(jobId) {
    this.hide();
    const generation = ++this.generation;
    const { els } = this;
    this.job = null;
    this.jobId = jobId;
    this.raw = [];
    this.cancelSent = false;
    this.log = new AnsiLog(els.log);
    els.log.replaceChildren();
    els.id.textContent = jobId;
    els.result.hidden = true;
    els.stream.textContent = "";
    els.cancel.disabled = true;
    this.follow(true);
    let job;
    try {
      job = await getJob(jobId);
    } catch (error) {
      if (generation !== this.generation) return;
      if (error.status === 404 || error.status === 422) this.onMissing(jobId);
      else this.onError(error);
      return;
    }
    if (generation !== this.generation) return;
    els.section.hidden = false;
    this.update(job);
    this.ticker = setInterval(() => this.renderFacts(), TICK_MS);
    this.events = new JobEvents(eventsUrl(jobId), {
      onEvent: (kind, data) => this.onEvent(kind, data),
      onState: (state) => { els.stream.textContent = STREAM_STATES[state] ?? ""; },
      onFatal: (error) => {
        if (error.status === 404) this.onMissing(jobId);
        else this.onError(error);
      },
    }).start();
  }

  hide() {
    this.generation += 1;
    this.events?.stop();
    this.events = null;
    clearInterval(this.ticker);
    this.els.section.hidden = true;
  }

  onEvent(kind, data) {
    if (kind === "output") {
      this.raw.push(data.text);
      this.log.write(data.text);
      this.scrollSoon();
    } else if (kind === "status") {
      // The replay starts with the job's first status: never show a job going backwards.
      if (STAGE[data.status] <= STAGE[this.job.status]) return;
      this.update({ ...this.job, status: data.status });
      if (data.status === "running" && !this.job.start_time) this.reload();
    } else if (kind === "end") {
      this.update({ ...this.job, status: data.status, exit_code: data.exit_code,
        success: data.success, reason: data.reason });
      this.reload(); // for the end time
    }
  }

  async reload() {
    const generation = this.generation;
    try {
      const job = await getJob(this.jobId);
      if (generation === this.generation) this.update(job);
    } catch {
      // the stream carries on; the facts catch up on the next event
    }
  }

  update(job) {
    this.job = job;
    const terminal = TERMINAL.has(job.status);
    this.els.cancel.disabled = terminal || this.cancelSent;
    this.renderFacts();
    const line = resultLine(job);
    this.els.result.hidden = line === null;
    this.els.result.textContent = line ?? "";
    this.els.result.className = `result ${job.success ? "passed" : "failed"}`;
  }

  renderFacts() {
    const { job, els } = this;
    if (!job) return;
    els.status.textContent = job.status;
    els.status.className = `status status-${job.status}`;
    els.start.textContent = formatTime(job.start_time);
    els.end.textContent = formatTime(job.end_time);
    els.duration.textContent = formatDuration(durationMs(job));
  }

  async cancel() {
    const { els } = this;
    this.cancelSent = true;
    els.cancel.disabled = true;
    try {
      const job = await cancelJob(this.jobId);
      els.stream.textContent = "cancel requested…";
      this.update({ ...this.job, ...job });
    } catch (error) {
      this.cancelSent = false;
      els.cancel.disabled = TERMINAL.has(this.job?.status);
      this.onError(error);
    }
  }

  download() {
    // The output exactly as printed (ANSI codes included), as far as it has arrived.
    const blob = new Blob(this.raw, { type: "text/plain;charset=utf-8" });
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = `job-${this.jobId}.log`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  // -------------------------------------------------------------- follow the tail
  follow(on) {
    // Hiding the focused button would drop the focus to the page: hand it to the log first.
    if (on && document.activeElement === this.els.follow) this.els.log.focus();
    this.following = on;
    this.els.follow.hidden = on;
    if (on) this.toBottom();
  }

  scrollSoon() {
    if (!this.following || this.scrollPending) return;
    this.scrollPending = true;
    requestAnimationFrame(() => {
      this.scrollPending = false;
      if (this.following) this.toBottom();
    });
  }

  toBottom() {
    const { log } = this.els;
    log.scrollTop = log.scrollHeight;
    this.autoTop = log.scrollTop;
  }

  onScroll() {
    const { log } = this.els;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight <= BOTTOM_SLACK_PX;
    if (atBottom) {
      if (!this.following) this.follow(true);
    } else if (this.following && log.scrollTop < this.autoTop - BOTTOM_SLACK_PX) {
      // Moved up from where the page last put it: the user is reading; stop following.
      // (Output that arrived after our own scroll also leaves the view short of the bottom.)
      this.follow(false);
    }
  }
}
