// The page's entry point: sign in and out, and the routes `#/` (jobs, `#/?status=…` filtered)
// and `#/jobs/<id>` (one job). Routes live in the fragment, so the server only ever serves `/`
// and no page path can shadow the JSON API.

import { ApiError, forgetKey, keepKey, listJobs, storedKey } from "./api.js";
import { JobView } from "./job.js";
import { JobsView } from "./jobs.js";

const $ = (id) => document.getElementById(id);
const LOAD_ERROR = "Could not load: ";
let shownRoute = null; // the view on screen: "jobs", "job", "missing", or null (sign-in)

const els = {
  signOut: $("sign-out"),
  notice: $("notice"),
  signIn: $("view-sign-in"),
  signInForm: $("sign-in-form"),
  keyInput: $("api-key"),
  missing: $("view-missing"),
  missingId: $("missing-id"),
};

const jobs = new JobsView({
  section: $("view-jobs"), body: $("jobs-body"), empty: $("jobs-empty"),
  count: $("jobs-count"), filter: $("status-filter"),
}, { onError: handleError, onLoaded: clearLoadError });

const job = new JobView({
  section: $("view-job"), id: $("job-id"), status: $("job-status"), start: $("job-start"),
  end: $("job-end"), duration: $("job-duration"), result: $("job-result"),
  cancel: $("job-cancel"), download: $("job-download"), follow: $("job-follow"),
  stream: $("job-stream"), log: $("job-log"),
}, { onError: handleError, onMissing: showMissing });

function showNotice(text) {
  els.notice.textContent = text;
  els.notice.hidden = !text;
}

function hideAll() {
  jobs.hide();
  job.hide();
  els.signIn.hidden = true;
  els.missing.hidden = true;
}

/** Put the keyboard focus on a view's heading, so a screen reader announces the new view. */
function focusHeading(section) {
  const heading = section.querySelector("h2");
  heading.tabIndex = -1;
  heading.focus({ preventScroll: true });
}

function showSignIn(message = "") {
  hideAll();
  shownRoute = null;
  els.signOut.hidden = true;
  els.signIn.hidden = false;
  showNotice(message);
  els.keyInput.focus();
}

function showMissing(jobId) {
  hideAll();
  shownRoute = "missing";
  els.missingId.textContent = jobId;
  els.missing.hidden = false;
  focusHeading(els.missing);
}

function handleError(error) {
  if (error instanceof ApiError && error.status === 401) {
    // The key stopped working (revoked, or its user deactivated): forget it.
    forgetKey();
    showSignIn(`Signed out: ${error.detail}`);
    return;
  }
  const text = error instanceof ApiError ? error.detail : "the server cannot be reached";
  showNotice(`${LOAD_ERROR}${text}`);
}

/** A refresh that worked again takes back the error the last one showed. */
function clearLoadError() {
  if (els.notice.textContent.startsWith(LOAD_ERROR)) showNotice("");
}

/** The route in the fragment: {name: "jobs", status} or {name: "job", id}. */
function currentRoute() {
  const hash = location.hash.replace(/^#/, "");
  const jobMatch = /^\/jobs\/([^/?]+)$/.exec(hash);
  if (jobMatch) {
    let id;
    try {
      id = decodeURIComponent(jobMatch[1]);
    } catch {
      id = jobMatch[1];
    }
    return { name: "job", id };
  }
  const query = new URLSearchParams(hash.split("?")[1] ?? "");
  return { name: "jobs", status: query.get("status") ?? "" };
}

function route() {
  if (!storedKey()) {
    showSignIn();
    return;
  }
  showNotice("");
  hideAll();
  els.signOut.hidden = false;
  const where = currentRoute();
  // A new filter keeps the focus where it is (on the filter); a new view takes it.
  const newView = shownRoute !== where.name || where.name === "job";
  shownRoute = where.name;
  if (where.name === "job") {
    job.show(where.id).then(() => {
      if (!$("view-job").hidden) focusHeading($("view-job"));
    });
  } else {
    jobs.show(where.status);
    if (newView) focusHeading($("view-jobs"));
  }
}

async function signIn(event) {
  event.preventDefault();
  const key = els.keyInput.value.trim();
  if (!key) {
    showNotice("Enter your API key.");
    els.keyInput.focus();
    return;
  }
  try {
    await listJobs({ limit: 1, key }); // one cheap call that says whether the key works
  } catch (error) {
    showNotice(error instanceof ApiError ? `Sign-in failed: ${error.detail}`
      : "Sign-in failed: the server cannot be reached");
    els.keyInput.select();
    return;
  }
  keepKey(key);
  els.keyInput.value = "";
  route();
}

function signOut() {
  forgetKey();
  els.keyInput.value = "";
  showSignIn("Signed out.");
}

els.signInForm.addEventListener("submit", signIn);
els.signOut.addEventListener("click", signOut);
$("status-filter").addEventListener("change", (event) => {
  const status = event.target.value;
  location.hash = status ? `#/?status=${encodeURIComponent(status)}` : "#/";
});
window.addEventListener("hashchange", route);
route();
