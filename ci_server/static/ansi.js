// Job output into the DOM: text nodes only, with ANSI SGR colours turned into classes.
//
// Output is text, never markup: every character a job prints becomes part of a Text node, so
// "<script>" shows as those eight characters. Escape sequences other than SGR (cursor moves,
// window titles) are dropped; a sequence split between two chunks is held until it is whole.
// A carriage return not followed by a newline starts the line over, as a terminal would
// (progress bars); "\r\n" is a plain line break.

const ESC = "\x1b";
// CSI (ESC [ params final), OSC (ESC ] ... BEL or ESC \), or any other two-character escape.
const SEQUENCE = /\x1b(?:\[([0-9;:?<=>]*)[ -/]*([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])/y;
const INCOMPLETE = /\x1b(?:\[[0-9;:?<=>]*[ -/]*|\][^\x07\x1b]*\x1b?)?$/;

const MAX_HELD = 256; // characters of an unfinished escape sequence kept for the next chunk
const BASIC = ["black", "red", "green", "yellow", "blue", "magenta", "cyan", "white"];

/** Colour 0–15: the eight basic colours, then their bright versions (classes in style.css). */
function named(n) {
  return { name: n < 8 ? BASIC[n] : `bright-${BASIC[n - 8]}` };
}

/** The xterm 256-colour palette entry n (16–255) as rgb(); 0–15 map to the named classes. */
function xterm256(n) {
  if (n < 232) {
    const index = n - 16;
    const level = (v) => (v === 0 ? 0 : 55 + v * 40);
    const r = level(Math.floor(index / 36));
    const g = level(Math.floor(index / 6) % 6);
    const b = level(index % 6);
    return `rgb(${r}, ${g}, ${b})`;
  }
  const grey = 8 + (n - 232) * 10;
  return `rgb(${grey}, ${grey}, ${grey})`;
}

/** Graphic rendition state: what the next characters look like. */
class Style {
  constructor() {
    this.reset();
  }

  reset() {
    this.fg = null; // {name} for the 16 named colours, {css} for 256-colour and true colour
    this.bg = null;
    this.bold = false;
    this.dim = false;
    this.italic = false;
    this.underline = false;
  }

  get plain() {
    return !this.fg && !this.bg && !this.bold && !this.dim && !this.italic && !this.underline;
  }

  /** Apply one SGR parameter list, e.g. "1;31" or "38;5;208". */
  apply(params) {
    const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => Number.parseInt(p || "0", 10));
    for (let i = 0; i < codes.length; i++) {
      const code = codes[i];
      if (code === 0) this.reset();
      else if (code === 1) this.bold = true;
      else if (code === 2) this.dim = true;
      else if (code === 3) this.italic = true;
      else if (code === 4) this.underline = true;
      else if (code === 22) this.bold = this.dim = false;
      else if (code === 23) this.italic = false;
      else if (code === 24) this.underline = false;
      else if (code >= 30 && code <= 37) this.fg = named(code - 30);
      else if (code >= 90 && code <= 97) this.fg = named(code - 90 + 8);
      else if (code >= 40 && code <= 47) this.bg = named(code - 40);
      else if (code >= 100 && code <= 107) this.bg = named(code - 100 + 8);
      else if (code === 39) this.fg = null;
      else if (code === 49) this.bg = null;
      else if (code === 38 || code === 48) {
        const [colour, used] = extendedColour(codes, i + 1);
        i += used;
        if (colour) {
          if (code === 38) this.fg = colour;
          else this.bg = colour;
        }
      }
    }
  }

  /** A span for text in this style (the caller adds the text node). */
  span() {
    // Classes and CSSOM properties, never a style attribute: the page's CSP forbids those.
    const span = document.createElement("span");
    if (this.fg?.name) span.classList.add(`fg-${this.fg.name}`);
    if (this.fg?.css) span.style.color = this.fg.css;
    if (this.bg?.name) span.classList.add(`bg-${this.bg.name}`);
    if (this.bg?.css) span.style.backgroundColor = this.bg.css;
    if (this.bold) span.classList.add("sgr-bold");
    if (this.dim) span.classList.add("sgr-dim");
    if (this.italic) span.classList.add("sgr-italic");
    if (this.underline) span.classList.add("sgr-underline");
    return span;
  }
}

/** `38;5;n` or `38;2;r;g;b` after the 38/48 at codes[start - 1]: [colour, codes consumed]. */
function extendedColour(codes, start) {
  const valid = (v) => Number.isInteger(v) && v >= 0 && v <= 255;
  if (codes[start] === 5 && valid(codes[start + 1])) {
    const n = codes[start + 1];
    return [n < 16 ? named(n) : { css: xterm256(n) }, 2];
  }
  if (codes[start] === 2 && [1, 2, 3].every((k) => valid(codes[start + k]))) {
    const [r, g, b] = codes.slice(start + 1, start + 4);
    return [{ css: `rgb(${r}, ${g}, ${b})` }, 4];
  }
  return [null, codes.length]; // malformed: ignore the rest of this sequence
}

/** Appends output to a container element, one <div class="line"> per line. */
export class AnsiLog {
  constructor(container) {
    this.container = container;
    this.style = new Style();
    this.pending = ""; // an unfinished escape sequence, or a trailing "\r"
    this.line = null; // the <div> the next characters go to (made when they come)
    this.lines = 0;
  }

  /** Add `text` (any piece of the output, split anywhere) to the log. */
  write(text) {
    text = this.pending + text;
    this.pending = "";
    const incomplete = INCOMPLETE.exec(text);
    // Held only while short: an unterminated OSC must not swallow the rest of the output.
    if (incomplete && incomplete[0] && incomplete[0].length <= MAX_HELD) {
      this.pending = text.slice(incomplete.index);
      text = text.slice(0, incomplete.index);
    }
    if (text.endsWith("\r")) {
      this.pending = "\r" + this.pending;
      text = text.slice(0, -1);
    }
    let plainStart = 0;
    for (let i = 0; i < text.length; i++) {
      const ch = text[i];
      if (ch !== ESC && ch !== "\n" && ch !== "\r") continue;
      this.text(text.slice(plainStart, i));
      if (ch === "\n") {
        this.endLine();
        plainStart = i + 1;
      } else if (ch === "\r") {
        if (text[i + 1] === "\n") {
          this.endLine();
          i += 1;
        } else {
          this.currentLine().replaceChildren(); // the line is drawn again from its start
        }
        plainStart = i + 1;
      } else {
        SEQUENCE.lastIndex = i;
        const match = SEQUENCE.exec(text);
        if (!match) {
          plainStart = i + 1; // a lone ESC: drop it
          continue;
        }
        if (match[2] === "m") this.style.apply(match[1] ?? "");
        i += match[0].length - 1;
        plainStart = i + 1;
      }
    }
    this.text(text.slice(plainStart));
  }

  text(chars) {
    if (!chars) return;
    const node = document.createTextNode(chars);
    if (this.style.plain) {
      this.currentLine().append(node);
    } else {
      const span = this.style.span();
      span.append(node);
      this.currentLine().append(span);
    }
  }

  currentLine() {
    if (!this.line) {
      this.line = document.createElement("div");
      this.line.className = "line";
      this.container.append(this.line);
      this.lines += 1;
    }
    return this.line;
  }

  endLine() {
    this.currentLine();
    this.line = null;
  }
}
