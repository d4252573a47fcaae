// Appointments in the therapist's dashboard: the list by time (today's and
// upcoming first, then earlier ones), the new consult's appointment and the
// patient's e-mail address, the practice's appointment reference (where it
// allows one), and what became of an e-mailed invitation.
import { say, t } from "./i18n.js";

// When a consult happens, as far as the list is concerned: its appointment,
// else when it was made.
export function consultTime(consult) {
  return new Date(consult.scheduled_at || consult.created_at);
}

// The start of the day of `now`, in the browser's time zone.
export function startOfDay(now = new Date()) {
  return new Date(now.getFullYear(), now.getMonth(), now.getDate());
}

// [[titleKey, consults], ...]: from the start of today on, soonest first;
// before that, latest first. Empty groups are left out.
export function groupByTime(consults, now = new Date()) {
  const startOfToday = startOfDay(now);
  const upcoming = consults.filter((c) => consultTime(c) >= startOfToday);
  const earlier = consults.filter((c) => consultTime(c) < startOfToday);
  upcoming.sort((a, b) => consultTime(a) - consultTime(b));
  earlier.sort((a, b) => consultTime(b) - consultTime(a));
  return [
    ["app.list.today", upcoming],
    ["app.list.earlier", earlier],
  ].filter(([, items]) => items.length);
}

// The therapist's label of a consult in the list (null if none).
export function labelOf(consults, id) {
  const found = consults.find((c) => c.id === id);
  return (found && found.display_name) || null;
}

// The new-consult form's appointment and address, as request fields.
export function appointmentFields(form) {
  const fields = {};
  const when = form.querySelector("#scheduled-at").value;
  // datetime-local is the browser's local time; the API wants an offset.
  if (when) fields.scheduled_at = new Date(when).toISOString();
  const email = form.querySelector("#patient-email").value.trim();
  if (email) fields.email = email;
  const reference = form.querySelector("#appointment-reference");
  if (!reference.closest("[hidden]") && reference.value.trim()) fields.appointment_reference = reference.value.trim();
  return fields;
}

export function clearAppointmentFields(form) {
  form.querySelector("#scheduled-at").value = "";
  form.querySelector("#patient-email").value = "";
  form.querySelector("#appointment-reference").value = "";
}

// The reference field only where the practice takes one (the session says).
export function offerReference(form, practice) {
  form.querySelector("#reference-field").hidden = !(practice && practice.appointment_reference_allowed);
}

// Asks for the patient's address; the body for a reissued link (null: cancelled).
export function askForEmail() {
  const email = prompt(t("app.list.mailPrompt"));
  if (email === null || !email.trim()) return null;
  return { email: email.trim() };
}

// Tells the therapist whether the mail server took the invitation.
export function showMailOutcome(element, data) {
  const outcome = data.invite_email;
  element.hidden = !outcome;
  if (!outcome) {
    say(element, "");
    return;
  }
  element.className = outcome.sent ? "note" : "error";
  if (outcome.sent) {
    say(element, "app.invite.mailSent");
    return;
  }
  // Known reasons in the page's language (again in another when it changes);
  // the server's words for one this page does not know.
  const { code, message } = outcome.error;
  say(element, `app.invite.mailFailed.${code}`, {}, t("app.invite.mailFailed", { reason: message }));
}
