// Enrolment page: set a password, connect an authenticator app, confirm a code.
// Talks to /api/enrolment/{token}; no inline script (the CSP forbids it).
import { setupLanguage, t, translatePage } from "./i18n.js";

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

function message(result) {
  return (result.data && result.data.error && result.data.error.message) || t("common.failed");
}

function showRole() {
  if (role) $("account-role").textContent = t(`role.${role}`, {}, role);
}

async function start() {
  let status;
  try {
    status = await call(api);
  } catch {
    $("checking").querySelector("p").textContent = t("common.offline");
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
    $("password-label").dataset.i18n = "enrol.currentPassword";
    $("password-label").textContent = t("enrol.currentPassword");
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
    error.textContent = t("enrol.passwordShort");
    return;
  }
  if (!keepsPassword && password !== $("password-again").value) {
    error.textContent = t("enrol.passwordDiffers");
    return;
  }
  const result = await call(`${api}/password`, { password });
  if (result.status === 404) {
    show("invalid");
    return;
  }
  if (!result.ok) {
    error.textContent = message(result);
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
    error.textContent = t("login.codeDigits");
    return;
  }
  const result = await call(`${api}/confirm`, { code });
  if (result.status === 404) {
    show("invalid");
    return;
  }
  if (!result.ok) {
    error.textContent = message(result);
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
