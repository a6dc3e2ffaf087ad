// A job's Server-Sent Events, read with fetch so the API key goes in a header.
//
// The browser's EventSource cannot send an Authorization header, and a key in the URL would
// end up in logs and history; so the stream is read here, parsed as the SSE spec says, and
// resumed the way EventSource would: after a dropped connection, the next request carries
// `Last-Event-ID` with the last id received (the server's opening message already carries
// one), so no event is lost or repeated. The server sends keep-alive comments while quiet; a
// stream silent for much longer than that is taken for dead and reopened.

import { authHeaders, errorFrom } from "./api.js";

const FIRST_RETRY_MS = 250;
const MAX_RETRY_MS = 5000;
const SILENCE_LIMIT_MS = 45000; // three keep-alive intervals (CI_SSE_KEEPALIVE, 15 s default)
const FATAL = new Set([400, 401, 403, 404]);

/** Incremental SSE parser: feed it text, it calls onMessage({id, event, data}) per message. */
export class SseParser {
  constructor(onMessage, onId) {
    this.onMessage = onMessage;
    this.onId = onId;
    this.buffer = "";
    this.reset();
  }

  reset() {
    this.event = "";
    this.data = [];
    this.id = null;
  }

  feed(text) {
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk.
      if (!match || (match[0] === "\r" && match.index === this.buffer.length - 1)) return;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive, or the opening message)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
  }

  dispatch() {
    // As EventSource does: a message's id counts even when it has no data (the opening one).
    if (this.id !== null) this.onId(this.id);
    if (this.data.length) {
      this.onMessage({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
    }
    this.reset();
  }
}

/**
 * Follows one job's events until its `end` event, reconnecting as needed.
 *
 * handlers: onEvent(kind, data, seq), onState("connecting" | "live" | "reconnecting" | "ended"),
 * onFatal(ApiError) for answers that a retry would not change (bad key, no such job).
 */
export class JobEvents {
  constructor(url, handlers) {
    this.url = url;
    this.handlers = handlers;
    this.lastId = null;
    this.lastSeq = 0;
    this.stopped = false;
    this.attempt = null;
  }

  start() {
    this.run();
    return this;
  }

  stop() {
    this.stopped = true;
    this.attempt?.abort();
  }

  async run() {
    let delay = FIRST_RETRY_MS;
    this.handlers.onState("connecting");
    while (!this.stopped) {
      let wait = delay;
      try {
        if (await this.once()) {
          this.handlers.onState("ended");
          return;
        }
        delay = FIRST_RETRY_MS; // the stream was open: start backing off afresh
        wait = delay;
      } catch (error) {
        if (this.stopped) return;
        if (error.status !== undefined) {
          if (FATAL.has(error.status)) {
            this.handlers.onFatal(error);
            return;
          }
          if (error.retryAfterS !== null) wait = error.retryAfterS * 1000;
        }
        delay = Math.min(delay * 2, MAX_RETRY_MS);
      }
      if (this.stopped) return;
      this.handlers.onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  /** One request: true once the end event arrived; false or a throw when it must be retried. */
  async once() {
    const attempt = new AbortController();
    this.attempt = attempt;
    const headers = { ...authHeaders(), Accept: "text/event-stream" };
    if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
    const response = await fetch(`${this.url}?since=start`, {
      headers, cache: "no-store", credentials: "omit", signal: attempt.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    this.handlers.onState("live");
    let ended = false;
    const parser = new SseParser((message) => {
      if (this.deliver(message)) ended = true;
    }, (id) => { this.lastId = id; });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let watchdog = setTimeout(() => attempt.abort(), SILENCE_LIMIT_MS);
    try {
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        clearTimeout(watchdog);
        watchdog = setTimeout(() => attempt.abort(), SILENCE_LIMIT_MS);
        parser.feed(value);
      }
    } finally {
      clearTimeout(watchdog);
      if (ended) attempt.abort(); // the server closes after end; do not wait for it
    }
    return ended;
  }

  deliver(message) {
    const seq = Number.parseInt(message.id ?? "", 10);
    // Ids only grow; one at or below the last handled would be a repeat.
    if (Number.isFinite(seq)) {
      if (seq <= this.lastSeq) return false;
      this.lastSeq = seq;
    }
    let data;
    try {
      data = JSON.parse(message.data);
    } catch {
      return false;
    }
    this.handlers.onEvent(message.event, data, seq);
    return message.event === "end";
  }
}
