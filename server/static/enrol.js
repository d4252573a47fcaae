// Enrolment page: set a password, connect an authenticator app, confirm a code.
// Talks to /api/enrolment/{token}; no inline script (the CSP forbids it).
"use strict";

const token = decodeURIComponent(location.pathname.split("/").pop() || "");
const api = `/api/enrolment/${encodeURIComponent(token)}`;

function show(id) {
  for (const section of document.querySelectorAll("main > section")) {
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
  return (result.data && result.data.error && result.data.error.message) || "Something went wrong; please try again.";
}

async function start() {
  const status = await call(api);
  if (!status.ok) {
    show("invalid");
    return;
  }
  document.getElementById("account-email").textContent = status.data.email;
  document.getElementById("account-role").textContent = status.data.role;
  show("password-step");
}

document.getElementById("password-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("password-error");
  const password = document.getElementById("password").value;
  if (password !== document.getElementById("password-again").value) {
    error.textContent = "The two passwords are not the same.";
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
  document.getElementById("qr-code").src = result.data.qr_code;
  document.getElementById("totp-secret").textContent = result.data.totp_secret;
  show("totp-step");
  document.getElementById("code").focus();
});

document.getElementById("code-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("code-error");
  const code = document.getElementById("code").value.trim();
  if (!/^[0-9]{6}$/.test(code)) {
    error.textContent = "The code has 6 digits.";
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

start();
