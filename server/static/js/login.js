// The professional's login: e-mail address, password and a TOTP code.
import { say, setupLanguage, translatePage } from "./i18n.js";
import { HOME } from "./roles.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function nextPage(role) {
  // Each role's own page (roles.js); an unknown role gets the therapist's, which says so.
  const home = HOME[role] || "/app";
  // Only our own pages (never an address elsewhere: not "//host", "/\\host"…),
  // and only the role's own page, so a stale "next" cannot land on another's.
  try {
    const next = new URL(params.get("next") || home, location.origin);
    if (next.origin === location.origin && next.pathname === home) return next.pathname + next.search;
  } catch {
    // not an address at all
  }
  return home;
}

// Where to go once logged in: the session says which role this account has.
function goTo(session, replace = false) {
  const target = nextPage(session.account && session.account.role);
  if (replace) location.replace(target);
  else location.assign(target);
}

function notice() {
  const reason = params.get("reason");
  if (reason) {
    say($("login-notice"), `login.reason.${reason}`, {}, "");
    $("login-notice").hidden = !$("login-notice").textContent;
  }
}

// How long to wait, from the server's Retry-After (seconds): [key, values].
function lockedText(retryAfter) {
  const seconds = Number.parseInt(retryAfter || "", 10);
  if (!Number.isFinite(seconds) || seconds <= 0) return ["login.locked", {}];
  if (seconds < 60) return ["login.lockedSeconds", { seconds }];
  return ["login.lockedMinutes", { minutes: Math.ceil(seconds / 60) }];
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = $("login-error");
  const body = {
    email: $("email").value.trim(),
    password: $("password").value,
    code: $("code").value.trim(),
  };
  if (!body.email || !body.password) {
    say(error, "login.missing");
    return;
  }
  if (!/^[0-9]{6}$/.test(body.code)) {
    say(error, "login.codeDigits");
    return;
  }
  $("login-button").disabled = true;
  try {
    const response = await fetch("/api/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({}));
    // The login's answer is the new session: no second request for the role.
    if (response.ok && data.account) {
      goTo(data);
      return;
    }
    const code = data.error && data.error.code;
    if (code === "login_locked") say(error, ...lockedText(response.headers.get("Retry-After")));
    else if (code === "login_failed") say(error, "login.failed");
    else if (data.error && data.error.message) say(error, "common.serverSaid", { words: data.error.message });
    else say(error, "common.failed");
  } catch {
    say(error, "common.offline");
  } finally {
    $("login-button").disabled = false;
  }
});

setupLanguage($("language"), () => {
  translatePage();
  notice();
});
translatePage();
notice();
