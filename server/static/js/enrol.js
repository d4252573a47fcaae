// Enrolment page: set a password, connect an authenticator app, confirm a code.
// Talks to /api/enrolment/{token}; no inline script (the CSP forbids it).
import { say, setupLanguage, t, translatePage } from "./i18n.js";

const token = decodeURIComponent(location.pathname.split("/").pop() || "");
const api = `/api/enrolment/${encodeURIComponent(token)}`;
const $ = (id) => document.getElementById(id);
let role = null;
let keepsPassword = false;

function show(id) {
  for (const section of document.querySelectorAll("main section")) {
    section.hidden = section.id !== id;
  }
}

async function call(path, body) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const data = await response.json().catch(() => ({}));
  return { ok: response.ok, status: response.status, data };
}

// The server's words (they name what to fix), else ours: shown by key, so a
// change of language renders it again.
function sayProblem(element, result) {
  const words = result.data && result.data.error && result.data.error.message;
  if (words) say(element, "common.serverSaid", { words });
  else say(element, "common.failed");
}

function showRole() {
  if (role) $("account-role").textContent = t(`role.${role}`, {}, role);
}

async function start() {
  let status;
  try {
    status = await call(api);
  } catch {
    say($("checking").querySelector("p"), "common.offline");
    setTimeout(start, 3000);
    return;
  }
  if (!status.ok) {
    show("invalid");
    return;
  }
  $("account-email").textContent = status.data.email;
  role = status.data.role;
  showRole();
  keepsPassword = Boolean(status.data.keeps_password);
  if (keepsPassword) {
    // After a reset of the app alone: the password stays, and proves it is them.
    $("keeps-password").hidden = false;
    say($("password-label"), "enrol.currentPassword");
    $("password").autocomplete = "current-password";
    $("password").removeAttribute("minlength");
    $("password-again").required = false;
    $("password-again-field").hidden = true;
  }
  show("password-step");
}

$("password-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = $("password-error");
  const password = $("password").value;
  if (keepsPassword) {
    if (!password) return;
  } else if (password.length < 12) {
    say(error, "enrol.passwordShort");
    return;
  }
  if (!keepsPassword && password !== $("password-again").value) {
    say(error, "enrol.passwordDiffers");
    return;
  }
  const result = await call(`${api}/password`, { password });
  if (result.status === 404) {
    show("invalid");
    return;
  }
  if (!result.ok) {
    sayProblem(error, result);
    return;
  }
  $("qr-code").src = result.data.qr_code;
  $("totp-secret").textContent = result.data.totp_secret;
  show("totp-step");
  $("code").focus();
});

$("code-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = $("code-error");
  const code = $("code").value.trim();
  if (!/^[0-9]{6}$/.test(code)) {
    say(error, "login.codeDigits");
    return;
  }
  const result = await call(`${api}/confirm`, { code });
  if (result.status === 404) {
    show("invalid");
    return;
  }
  if (!result.ok) {
    sayProblem(error, result);
    return;
  }
  show("done");
});

setupLanguage($("language"), () => {
  translatePage();
  showRole();
});
translatePage();
start();
