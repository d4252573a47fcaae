// What the admin console's modules share: the API call with its errors said
// in the page's language, the idle logout, and dates in the browser's locale.
import { language, t } from "./i18n.js";
import { toLogin } from "./ui.js";

export const $ = (id) => document.getElementById(id);

let idleTimeoutS = 900;
let idleTimer = null;

// --- talking to the API ----------------------------------------------------------

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
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

// The server ends a session after idle_timeout_s without a request; this page
// makes requests only when asked, so it leaves when the server would.
export function sessionTouched(timeoutS = idleTimeoutS) {
  idleTimeoutS = timeoutS;
  clearTimeout(idleTimer);
  idleTimer = setTimeout(() => toLogin("idle"), idleTimeoutS * 1000);
}

export function stopIdleTimer() {
  clearTimeout(idleTimer);
}

// What went wrong, in the page's language; the server's own words (English,
// precise) follow where they name what to fix.
export function problem(error) {
  if (!error.status) return t("common.offline");
  if (error.code === "reset_by_operator") return t("admin.error.resetByOperator");
  if (error.status === 409 && /last active admin/.test(error.message)) return t("admin.error.lastAdmin");
  if (error.status === 409) return t("admin.error.emailTaken");
  if (error.status === 404) return t("admin.error.notFound");
  if (error.status === 403) return t("apiError.forbidden");
  if (error.status === 422) return t("admin.error.invalid", { detail: error.message });
  return t("common.failed");
}

// --- formatting ----------------------------------------------------------------------

export function locale() {
  const chosen = language();
  const preferred = navigator.languages || [navigator.language || chosen];
  return preferred.find((tag) => tag.toLowerCase().split("-")[0] === chosen) || chosen;
}

export function dayText(day) {
  const options = { day: "numeric", month: "short", year: "numeric" };
  return new Intl.DateTimeFormat(locale(), options).format(new Date(`${day}T12:00:00`));
}

export function momentText(iso) {
  const options = { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" };
  return new Intl.DateTimeFormat(locale(), options).format(new Date(iso));
}

export function option(value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  return element;
}
