// The therapist's idle logout at /app: a warning first, then the login page.
// Activity in any of the therapist's tabs keeps them all awake, an open
// consult counts as activity, and the server's idle clock is touched while
// the therapist is at work.
//
// The countdown runs to the server's own end of the session: its idle clock
// restarts only when it marks the session seen, which the keep-alive
// (POST /api/session/touch) always does and any other request at most once a
// minute. So the page counts from the last keep-alive that was answered (in
// any tab), or from the last activity if that is earlier.
//
// The login itself runs out a fixed time after it (sessions.absolute_timeout_s,
// 12 hours), whatever happens, and a call still open then is cut: ten minutes
// before, the page says when.
import { formatTime, say } from "./i18n.js";
import { toLogin } from "./ui.js";

const $ = (id) => document.getElementById(id);
const IDLE_WARNING_S = 90;
const LOGIN_END_WARNING_S = 600;
// While the therapist is at work, the keep-alive goes at most this often.
const TOUCH_EVERY_MS = 30_000;
// Any answered request means the server marked the session at most this
// long before (server/auth/sessions.py, TOUCH_EVERY_S).
const SERVER_MARKS_EVERY_MS = 60_000;
// Shared by the therapist's tabs: activity in one keeps the others awake,
// and a keep-alive from one restarts the server's clock for all.
const ACTIVITY_KEY = "videoconsult.activity";
const MARKED_KEY = "videoconsult.marked";

export class IdleWatch {
  // inCall(): whether a consult socket is open; touch(): the keep-alive, a
  // promise that fails when it was not answered.
  constructor({ inCall, touch }) {
    Object.assign(this, { inCall, touch });
    this.timeoutS = 900;
    this.lastActivity = Date.now();
    // When the keep-alive was last asked for, and when the server last marked
    // the session as far as this page knows (the page's own load was
    // answered, so at most a minute before now; the page asks once its
    // session is open).
    this.lastTouch = 0;
    this.lastMark = Date.now() - SERVER_MARKS_EVERY_MS;
    // When the login runs out, by this page's clock (loginEndsIn).
    this.loginEnd = null;
  }

  // The server's answer: the login runs out ``seconds`` from now.
  loginEndsIn(seconds) {
    this.loginEnd = Date.now() + seconds * 1000;
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
      // Keep the server's idle clock in step with a therapist who is at work.
      this.keepAlive();
    }
  }

  async keepAlive() {
    const asked = Date.now();
    this.lastTouch = asked;
    try {
      await this.touch();
    } catch {
      return; // not answered: the server's clock is where it was
    }
    // The server marked the session when the request arrived, after ``asked``.
    if (asked > this.lastMark) {
      this.lastMark = asked;
      localStorage.setItem(MARKED_KEY, String(asked));
    }
  }

  checkLoginEnd() {
    if (this.loginEnd === null) return;
    const box = $("session-end-warning");
    const due = this.loginEnd - Date.now() <= LOGIN_END_WARNING_S * 1000;
    if (due && box.hidden) {
      say($("session-end-text"), "app.sessionEnd.warning", {
        time: formatTime(new Date(this.loginEnd).toISOString()),
      });
    }
    box.hidden = !due;
  }

  check() {
    // In a call too: the call is what the end of the login would cut.
    this.checkLoginEnd();
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
    const marked = Number(localStorage.getItem(MARKED_KEY)) || 0;
    if (marked > this.lastMark) this.lastMark = marked;
    // The server's session ends a timeout after its last mark; the page's
    // idle time a timeout after the last activity: whichever comes first.
    const since = Math.min(this.lastActivity, this.lastMark);
    const idleS = (Date.now() - since) / 1000;
    if (idleS >= this.timeoutS) {
      this.lastActivity = Date.now();
      toLogin("idle");
    } else if (idleS >= this.timeoutS - IDLE_WARNING_S) {
      const left = Math.max(0, Math.round(this.timeoutS - idleS));
      say($("idle-text"), "app.idle.warning", { seconds: left });
      $("idle-warning").hidden = false;
    } else {
      // Out of the warning's range again: a keep-alive answered after the
      // check showed it ("Stay logged in" on a slow line), or another tab's.
      $("idle-warning").hidden = true;
    }
  }
}
