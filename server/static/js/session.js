// What the professionals' pages (/app, /support, /admin) share: finding out
// who is logged in, logging out, and (/support, /admin) the API call with
// the idle logout of a page that makes requests only when asked.
import { LANGUAGE_CHANGED, say } from "./i18n.js";
import { loggingOut, showAccountNotices, toLogin } from "./ui.js";

const $ = (id) => document.getElementById(id);
// While the server cannot be reached, ask again this often.
const RETRY_MS = 3000;

let idleTimeoutS = 900;
let idleTimer = null;

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// The answer's JSON; an ApiError with the server's code and words otherwise
// (status 0: no connection). Not logged in (any more): to the login page.
export async function api(path, { method = "GET", body } = {}) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new ApiError(0, "offline", String(error));
  }
  sessionTouched();
  if (response.status === 401) {
    toLogin("session");
    throw new ApiError(401, "not_logged_in", "not logged in");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new ApiError(response.status, error.code, error.message || "");
  }
  return data;
}

// The server ends a session after idle_timeout_s without a request; a page
// that makes requests only when asked leaves when the server would. The
// server counts from its last mark of the session as seen, made at most once
// a minute (a tenth of the timeout if shorter): leave that much early.
export function sessionTouched(timeoutS = idleTimeoutS) {
  idleTimeoutS = timeoutS;
  clearTimeout(idleTimer);
  const markLagS = Math.min(60, idleTimeoutS / 10);
  idleTimer = setTimeout(() => toLogin("idle"), (idleTimeoutS - markLagS) * 1000);
}

export function stopIdleTimer() {
  clearTimeout(idleTimer);
}

async function fetchSession() {
  try {
    const response = await fetch("/api/session", { credentials: "same-origin" });
    if (response.status === 401) return "logged-out";
    if (response.ok) return await response.json();
  } catch {
    // no connection, or not JSON: as if the server were away
  }
  return null;
}

// The session once the server answers, with the account's address in #who
// and the notices for its holder in #account-notices. Not logged in: to the
// login page, and null. Meanwhile #loading says the server is away.
export async function openSession() {
  for (;;) {
    const session = await fetchSession();
    if (session === "logged-out") {
      toLogin("login");
      return null;
    }
    if (session) {
      $("who").textContent = session.account.email;
      const notices = session.notices || [];
      showAccountNotices($("account-notices"), notices);
      document.addEventListener(LANGUAGE_CHANGED, () => showAccountNotices($("account-notices"), notices));
      return session;
    }
    say($("loading").querySelector("p"), "common.offline");
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

// The #logout button: ``beforeLeave`` first (close a call, stop a timer),
// then the session ends on the server and the login page says so.
export function wireLogout(beforeLeave = () => {}) {
  $("logout").addEventListener("click", async () => {
    beforeLeave();
    loggingOut(); // a request answered 401 meanwhile says "session", not "logout": ignored
    await fetch("/api/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
    location.assign("/login?reason=logout");
  });
}
