// What the admin console's modules share: the API call (session.js) with its
// errors said in the page's language, and dates in the browser's locale.
import { locale, say } from "./i18n.js";

export { api, sessionTouched, stopIdleTimer } from "./session.js";

export const $ = (id) => document.getElementById(id);

// What went wrong, in the page's language, shown in ``element`` (and again
// in another language when it changes); the server's own words (English,
// precise) follow where they name what to fix. A 401 shows nothing: the
// page is on its way to the login.
export function showProblem(element, error) {
  if (error.status === 401) return;
  if (!error.status) say(element, "common.offline");
  else if (error.code === "reset_by_operator") say(element, "admin.error.resetByOperator");
  else if (error.status === 409 && /last active admin/.test(error.message)) say(element, "admin.error.lastAdmin");
  else if (error.status === 409) say(element, "admin.error.emailTaken");
  else if (error.status === 404) say(element, "admin.error.notFound");
  else if (error.status === 403) say(element, "apiError.forbidden");
  else if (error.status === 422) say(element, "admin.error.invalid", { detail: error.message });
  else say(element, "common.failed");
}

// --- formatting ----------------------------------------------------------------------

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
