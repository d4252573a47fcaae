// What the admin console's modules share: the API call (session.js) with its
// errors said in the page's language, dates in the browser's locale, small
// buttons, the confirmation dialog and copying a shown-once value.
import { locale, say, t } from "./i18n.js";

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

// A <select> of accounts (by address) after a first choice "anyone"; what was
// chosen stays chosen while that account is still there.
export function fillAccountSelect(select, accounts, anyoneText) {
  const chosen = select.value;
  select.replaceChildren(option("", anyoneText));
  for (const account of accounts) select.append(option(account.id, account.email));
  select.value = accounts.some((account) => account.id === chosen) ? chosen : "";
}

export function button(key, onClick, { danger = false, label = "" } = {}) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = danger ? "small danger" : "small secondary";
  element.textContent = t(key);
  if (label) element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

// --- a confirmation that says what happens ------------------------------------------

export function confirmAction({ title, text, items = [], yes }) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-list").replaceChildren(
    ...items.map((item) => {
      const li = document.createElement("li");
      li.textContent = item;
      return li;
    }),
  );
  $("confirm-list").hidden = items.length === 0;
  $("confirm-yes").textContent = yes;
  return new Promise((resolve) => {
    const done = (answer) => {
      $("confirm-yes").onclick = null;
      $("confirm-no").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    $("confirm-yes").onclick = () => done(true);
    $("confirm-no").onclick = () => done(false);
    dialog.onclose = () => done(false);
    dialog.showModal();
    $("confirm-no").focus();
  });
}

// Copy what ``input`` shows (a link or a secret shown once) to the clipboard
// and say so in ``status``; when the browser refuses, leave it selected for
// Ctrl+C and say that instead.
export async function copyShown(input, status, { copied, byHand }) {
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    input.select();
    say(status, byHand);
    return;
  }
  say(status, copied);
}
