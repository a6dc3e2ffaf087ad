// The jobs list: the caller's jobs, newest first, refreshed every few seconds, one status or all.
//
// Rows are updated in place, keyed by job id, so a refresh never takes the keyboard focus away
// from the link the user is on.

import { listJobs } from "./api.js";
import { countsText, durationMs, formatDuration, formatTime, successMark } from "./format.js";

const REFRESH_MS = 2000;
const PAGE = 100;
const COLUMNS = ["Job ID", "Status", "Start time", "End time", "Duration", "Success", "Tests"];

export class JobsView {
  constructor(els, { onError, onLoaded }) {
    this.els = els; // section, body, empty, count, filter
    this.onError = onError;
    this.onLoaded = onLoaded;
    this.rows = new Map();
    this.timer = null;
    this.status = "";
    this.generation = 0;
  }

  show(status) {
    this.hide();
    this.status = status;
    this.els.filter.value = status;
    this.els.section.hidden = false;
    const generation = ++this.generation;
    const tick = async () => {
      await this.refresh(generation);
      if (generation === this.generation) this.timer = setTimeout(tick, REFRESH_MS);
    };
    tick();
  }

  hide() {
    this.generation += 1;
    clearTimeout(this.timer);
    this.els.section.hidden = true;
  }

  async refresh(generation) {
    let page;
    try {
      page = await listJobs({ status: this.status, limit: PAGE });
    } catch (error) {
      if (generation === this.generation) this.onError(error);
      return;
    }
    if (generation !== this.generation) return; // navigated away or changed the filter
    this.render(page);
    this.onLoaded();
  }

  render(page) {
    const { body, empty, count } = this.els;
    const seen = new Set();
    page.jobs.forEach((job, index) => {
      seen.add(job.id);
      let row = this.rows.get(job.id);
      if (!row) {
        row = newRow(job.id);
        this.rows.set(job.id, row);
      }
      fillRow(row, job);
      if (body.children[index] !== row) body.insertBefore(row, body.children[index] ?? null);
    });
    for (const [id, row] of this.rows) {
      if (!seen.has(id)) {
        row.remove();
        this.rows.delete(id);
      }
    }
    const which = this.status ? `${this.status} ` : "";
    empty.hidden = page.jobs.length > 0;
    empty.textContent = this.status ? `No ${this.status} jobs.`
      : "No jobs yet. Submit one with \"ci submit test\".";
    count.textContent = page.total > page.jobs.length
      ? `newest ${page.jobs.length} of ${page.total} ${which}jobs`
      : `${page.total} ${which}job${page.total === 1 ? "" : "s"}`;
  }
}

function newRow(jobId) {
  const row = document.createElement("tr");
  row.dataset.jobId = jobId;
  for (const label of COLUMNS) {
    const cell = document.createElement("td");
    cell.dataset.label = label;
    row.append(cell);
  }
  const [idCell, statusCell, , , , successCell] = row.children;
  idCell.className = "id";
  statusCell.className = "status";
  successCell.className = "success";
  const link = document.createElement("a");
  link.href = `#/jobs/${encodeURIComponent(jobId)}`;
  link.textContent = jobId;
  idCell.append(link);
  return row;
}

function fillRow(row, job) {
  const [, status, start, end, duration, success, tests] = row.children;
  setText(tests, job.report ? countsText(job.report) : PENDING_COUNTS);
  setText(status, job.status);
  status.className = `status status-${job.status}` +
    (job.success === true ? " passed" : job.success === false ? " failed" : "");
  setText(start, formatTime(job.start_time));
  setText(end, formatTime(job.end_time));
  setText(duration, formatDuration(durationMs(job)));
  const mark = successMark(job.success);
  setText(success, mark);
  success.className = `success${job.success === true ? " mark-pass" : ""}` +
    (job.success === false ? " mark-fail" : "");
  success.title = job.success === true ? "passed" : job.success === false ? "did not pass"
    : "not finished";
}

const PENDING_COUNTS = "-"; // no report: not finished, or the tests never ran

function setText(cell, text) {
  if (cell.textContent !== text) cell.textContent = text;
}
