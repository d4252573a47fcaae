// The therapist's idle logout at /app: a warning first, then the login page.
// Activity in any of the therapist's tabs keeps them all awake, an open
// consult counts as activity, and the server's idle clock is touched while
// the therapist is at work.
import { say } from "./i18n.js";
import { toLogin } from "./ui.js";

const $ = (id) => document.getElementById(id);
const IDLE_WARNING_S = 90;
// The server's idle clock restarts with every request; touching it this often
// keeps it at most this far behind the page's own.
const TOUCH_EVERY_MS = 30_000;
// Shared by the therapist's tabs: activity in one keeps the others awake.
const ACTIVITY_KEY = "videoconsult.activity";

export class IdleWatch {
  // inCall(): whether a consult socket is open; touch(): a request to the server.
  constructor({ inCall, touch }) {
    Object.assign(this, { inCall, touch });
    this.timeoutS = 900;
    this.lastActivity = Date.now();
    this.lastTouch = Date.now();
  }

  // Any request restarts the server's clock.
  touched() {
    this.lastTouch = Date.now();
  }

  // Watch the therapist's input, and check once a second.
  watch() {
    for (const kind of ["pointerdown", "keydown", "touchstart", "wheel"]) {
      window.addEventListener(kind, () => this.activity(), { passive: true });
    }
    setInterval(() => this.check(), 1000);
  }

  // "Stay logged in": activity that touches the server at once.
  stay() {
    this.lastTouch = 0;
    this.activity();
  }

  activity() {
    this.lastActivity = Date.now();
    localStorage.setItem(ACTIVITY_KEY, String(this.lastActivity));
    $("idle-warning").hidden = true;
    if (Date.now() - this.lastTouch > TOUCH_EVERY_MS) {
      // Keep the server's idle timer in step with a therapist who is at work.
      this.touch();
    }
  }

  check() {
    // An open consult socket keeps the session alive on the server, and
    // counts as activity for every tab.
    if (this.inCall()) {
      this.activity();
      return;
    }
    const shared = Number(localStorage.getItem(ACTIVITY_KEY)) || 0;
    if (shared > this.lastActivity) {
      this.lastActivity = shared;
      $("idle-warning").hidden = true;
    }
    const idleS = (Date.now() - this.lastActivity) / 1000;
    if (idleS >= this.timeoutS) {
      this.lastActivity = Date.now();
      toLogin("idle");
    } else if (idleS >= this.timeoutS - IDLE_WARNING_S) {
      const left = Math.max(0, Math.round(this.timeoutS - idleS));
      say($("idle-text"), "app.idle.warning", { seconds: left });
      $("idle-warning").hidden = false;
    }
  }
}
