// How jobs read on the page, the same words and marks as the `ci` command (ci_client/render.py).

export const PASSED_MARK = "✓";
export const FAILED_MARK = "✗";
export const PENDING_MARK = "-";
export const NOT_SET = "N/A";
export const TERMINAL = new Set(["completed", "failed", "cancelled"]);

const pad = (n) => String(n).padStart(2, "0");

/** Local time as `YYYY-MM-DD HH:MM:SS`, `N/A` when unset. */
export function formatTime(iso) {
  if (!iso) return NOT_SET;
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return NOT_SET;
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ` +
    `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
}

/** `4.2 s`, `3 min 07 s`, `2 h 05 min`. */
export function formatDuration(ms) {
  if (ms === null || ms < 0) return NOT_SET;
  const seconds = ms / 1000;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const whole = Math.floor(seconds);
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${pad(whole % 60)} s`;
  return `${Math.floor(whole / 3600)} h ${pad(Math.floor(whole / 60) % 60)} min`;
}

/** How long the job ran (so far, while it runs); null before it started. */
export function durationMs(job, now = Date.now()) {
  if (!job.start_time) return null;
  const end = job.end_time ? Date.parse(job.end_time) : TERMINAL.has(job.status) ? null : now;
  return end === null ? null : end - Date.parse(job.start_time);
}

/** `2 failed, 40 passed, 1 skipped`, in pytest's words and order, as `ci list` shows it. */
export function countsText(report) {
  const parts = [[report.failed, "failed"], [report.passed, "passed"],
    [report.skipped, "skipped"], [report.errors, report.errors === 1 ? "error" : "errors"]]
    .filter(([count]) => count > 0).map(([count, word]) => `${count} ${word}`);
  return parts.length ? parts.join(", ") : "no tests ran";
}

/** ✓ passed, ✗ did not pass, - not finished yet. */
export function successMark(success) {
  if (success === null || success === undefined) return PENDING_MARK;
  return success ? PASSED_MARK : FAILED_MARK;
}

/** How a finished job ended, as `ci` prints it last; null while it is not finished. */
export function resultLine(job) {
  if (!TERMINAL.has(job.status)) return null;
  if (job.status === "completed") {
    return job.success
      ? `${PASSED_MARK} Tests passed (exit code ${job.exit_code})`
      : `${FAILED_MARK} Tests failed (exit code ${job.exit_code})`;
  }
  if (job.status === "cancelled") return `${FAILED_MARK} Job cancelled`;
  return `${FAILED_MARK} Job failed: ${job.reason || "no reason given"}`;
}
